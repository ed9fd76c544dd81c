"""The report page's inline style sheet and script (no network, no library): hover read-outs on figures.

The script reads each figure's data from a ``<script type="application/json">`` block, maps the pointer
to data coordinates with the axes box and limits saved beside the PNG, and writes the value under the
pointer into a tooltip with ``textContent`` only (a user's layer names are never parsed as HTML).
"""

CSS = """
:root{--fg:#1f2328;--muted:#57606a;--line:#d0d7de;--bg2:#f6f8fa}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);max-width:1180px;margin:1.5em auto;padding:0 1em}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.3em;border-bottom:1px solid var(--line);padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.4em 0 .4em}
p,li{overflow-wrap:anywhere}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--bg2);padding:.05em .3em;border-radius:.25em;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--bg2);padding:.6em;font-size:12.5px}
nav{margin:1em 0;color:var(--muted)}nav a{margin-right:1em}
.gp-meta,figcaption,.gp-note{color:var(--muted);font-size:13px}
.gp-table{border-collapse:collapse;margin:.5em 0;font-size:13.5px}
.gp-table th,.gp-table td{border:1px solid var(--line);padding:.25em .55em;text-align:left;vertical-align:top}
.gp-table th{background:var(--bg2)}.gp-table td.num{text-align:right;font-variant-numeric:tabular-nums}
.gp-table tbody tr:nth-child(even){background:#fbfbfc}
.gp-scroll{overflow-x:auto}
.gp-badge{margin-right:.25em}
.gp-sev{color:var(--muted);font-size:13px}
.gp-evidence li{margin:.2em 0}
.gp-remedies li{margin:.45em 0}
.gp-figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:1em}
figure{margin:0;position:relative}
figure img{width:100%;height:auto;border:1px solid #eee;display:block}
.gp-guide{position:absolute;top:0;width:1px;background:rgba(200,30,30,.6);pointer-events:none;display:none}
#gp-tip{position:fixed;z-index:10;pointer-events:none;background:#111;color:#fff;font-size:12.5px;padding:.25em .5em;border-radius:.3em;max-width:28em;overflow-wrap:anywhere}
details{margin:.6em 0}summary{cursor:pointer;color:var(--muted)}
footer{margin-top:3em;border-top:1px solid var(--line);color:var(--muted);font-size:13px}
"""

JS = r"""
(function () {
  "use strict";
  var tip = document.getElementById("gp-tip");
  function fmt(v) {
    if (v === null || v === undefined) { return "not measured"; }
    var a = Math.abs(v);
    return (a !== 0 && (a < 1e-3 || a >= 1e4)) ? v.toExponential(2) : String(Number(v.toPrecision(3)));
  }
  function toData(f, lim, log) {
    if (log) { var a = Math.log10(lim[0]), b = Math.log10(lim[1]); return Math.pow(10, a + f * (b - a)); }
    return lim[0] + f * (lim[1] - lim[0]);
  }
  function toFrac(v, lim, log) {
    if (v === null) { return null; }
    if (log) {
      if (!(v > 0)) { return null; }
      var a = Math.log10(lim[0]), b = Math.log10(lim[1]);
      return (Math.log10(v) - a) / (b - a);
    }
    return (v - lim[0]) / (lim[1] - lim[0]);
  }
  function nearest(xs, x) {
    var best = -1, d = Infinity;
    for (var i = 0; i < xs.length; i++) {
      if (xs[i] === null) { continue; }
      var e = Math.abs(xs[i] - x);
      if (e < d) { d = e; best = i; }
    }
    return best;
  }
  function hide(guide) { tip.hidden = true; if (guide) { guide.style.display = "none"; } }
  function markText(spec, fx) {
    var best = null, d = 0.012;  // within about 1 % of the axes' width of a spike's line
    (spec.marks || []).forEach(function (m) {
      var f = toFrac(m.x, spec.xlim, spec.xlog);
      if (f !== null && Math.abs(f - fx) <= d) { d = Math.abs(f - fx); best = {text: m.text, gx: f}; }
    });
    return best;
  }
  function lineText(spec, fx, fy) {
    var mark = markText(spec, fx);
    if (mark !== null) { return mark; }
    var i = nearest(spec.x, toData(fx, spec.xlim, spec.xlog));
    if (i < 0) { return null; }
    var best = null, d = Infinity;
    spec.series.forEach(function (s) {
      var f = toFrac(s.y[i], spec.ylim, spec.ylog);
      if (f !== null && Math.abs(f - fy) < d) { d = Math.abs(f - fy); best = s; }
    });
    var head = spec.xname + " " + spec.x[i];
    var text = best === null ? head + ": not measured"
      : (spec.series.length > 1 ? best.name + " · " : "") + head + ": " + spec.label + " = " + fmt(best.y[i]);
    return {text: text, gx: toFrac(spec.x[i], spec.xlim, spec.xlog)};
  }
  function heatText(spec, fx, fy) {
    var col = Math.round(toData(fx, spec.xlim, false)), row = Math.round(toData(fy, spec.ylim, false));
    if (col < 0 || col >= spec.x.length || row < 0 || row >= spec.rows.length) { return null; }
    return {text: spec.rows[row] + " · step " + spec.x[col] + ": " + spec.label + " = " + fmt(spec.z[row][col]),
            gx: toFrac(col, spec.xlim, false)};
  }
  var figures = document.querySelectorAll("figure[data-hover]");
  Array.prototype.forEach.call(figures, function (fig) {
    var data = document.getElementById(fig.getAttribute("data-hover"));
    if (!data) { return; }
    var spec = JSON.parse(data.textContent);
    var img = fig.querySelector("img"), guide = fig.querySelector(".gp-guide");
    img.addEventListener("mousemove", function (ev) {
      var r = img.getBoundingClientRect(), b = spec.box;
      var fx = ((ev.clientX - r.left) / r.width - b[0]) / (b[2] - b[0]);
      var fy = (b[3] - (ev.clientY - r.top) / r.height) / (b[3] - b[1]);
      if (fx < 0 || fx > 1 || fy < 0 || fy > 1) { hide(guide); return; }
      var got = spec.kind === "heat" ? heatText(spec, fx, fy) : lineText(spec, fx, fy);
      if (got === null) { hide(guide); return; }
      tip.textContent = got.text;
      tip.hidden = false;
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
      tip.style.top = (ev.clientY + 16) + "px";
      if (guide && got.gx !== null) {
        guide.style.display = "block";
        guide.style.left = ((b[0] + got.gx * (b[2] - b[0])) * r.width) + "px";
        guide.style.top = (b[1] * r.height) + "px";
        guide.style.height = ((b[3] - b[1]) * r.height) + "px";
      }
    });
    img.addEventListener("mouseleave", function () { hide(guide); });
  });
  document.documentElement.setAttribute("data-gp-ready", String(figures.length));
})();
"""
