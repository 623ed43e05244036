"""The page's own CSS and script, inlined into report.html (the page loads nothing from anywhere).

The script adds the plots' hover read-out and the step selector of the samples. It runs inside try/catch:
when everything is set up it appends `<div id="opd-report-ready">`, and on any error (also a later one in
an event handler) `<div id="opd-report-error">` with the message, so a test in a headless browser can tell
a page that works from one that only loads.
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 16px 24px; color: #111; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { margin-top: 28px; border-bottom: 1px solid #ccc; }
.summary, .note { color: #444; } .note { font-size: 12px; margin: 2px 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
.plot { margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 4px; position: relative; }
.plot figcaption { font-weight: 600; margin-bottom: 4px; }
.plot svg { width: 100%; height: auto; display: block; }
.plot .frame { fill: none; stroke: #999; } .plot .grid { stroke: #eee; }
.plot .tick { font-size: 11px; fill: #333; } .plot .axis-title { font-size: 12px; fill: #111; }
.plot .cursor { stroke: #555; stroke-dasharray: 3 3; }
.legend { list-style: none; padding: 0; margin: 4px 0 0; font-size: 12px; columns: 2; }
.swatch { display: inline-block; width: 12px; height: 3px; margin-right: 6px; vertical-align: middle; }
.readout { position: absolute; top: 30px; right: 14px; background: rgba(255,255,255,.94); border: 1px solid #bbb;
  font-size: 12px; padding: 4px 6px; pointer-events: none; white-space: pre; display: none; }
.colour-legend { display: flex; align-items: center; gap: 8px; font-size: 12px; margin: 8px 0; }
.colour-legend .bar { display: inline-block; width: 260px; height: 14px; border: 1px solid #999; }
.sample { border: 1px solid #ddd; border-radius: 4px; padding: 6px 8px; margin: 8px 0; }
.sample header { font-size: 12px; color: #444; } .sample pre { white-space: pre-wrap; margin: 4px 0; }
.tokens { font: 13px/1.9 ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; padding: 1px 0; } .tok.no-teacher { background: #ddd; }
.tok.given { text-decoration: underline; text-decoration-thickness: 2px; } .tok.outlier { outline: 2px solid #000; }
.disagreements { font: 13px/1.9 ui-monospace, monospace; } .disagreements .where, .disagreements .values
  { font: 12px system-ui, sans-serif; color: #555; } .context { color: #666; white-space: pre-wrap; }
#opd-report-error { color: #b00; font-weight: 600; }
"""

SCRIPT = r"""
(function () {
  var status = document.getElementById("opd-report-status");
  function fail(error) {
    if (document.getElementById("opd-report-error")) { return; }
    var box = document.createElement("div");
    box.id = "opd-report-error";
    box.textContent = "report script error: " + (error && error.message ? error.message : String(error));
    status.appendChild(box);
  }
  window.addEventListener("error", function (event) { fail(event.error || event.message); });

  function nearest(points, step) {
    var best = null;
    for (var i = 0; i < points.length; i++) {
      if (best === null || Math.abs(points[i][0] - step) < Math.abs(best[0] - step)) { best = points[i]; }
    }
    return best;
  }

  function setUpPlot(figure) {
    var svg = figure.querySelector("svg");
    if (!svg) { return; }
    var points = JSON.parse(figure.getAttribute("data-points"));
    var box = svg.getAttribute("data-box").split(" ").map(Number);  // left, right, width, x_low, x_high
    var cursor = svg.querySelector(".cursor");
    var readout = document.createElement("div");
    readout.className = "readout";
    figure.appendChild(readout);
    svg.addEventListener("mousemove", function (event) {
      var rect = svg.getBoundingClientRect();
      var x = (event.clientX - rect.left) * box[2] / rect.width;
      var step = box[3] + (x - box[0]) / (box[2] - box[0] - box[1]) * (box[4] - box[3]);
      var lines = [];
      Object.keys(points).forEach(function (key) {
        var point = nearest(points[key], step);
        if (point) { lines.push(key + " = " + Number(point[1]).toPrecision(4) + "  (step " + point[0] + ")"); }
      });
      cursor.setAttribute("x1", x); cursor.setAttribute("x2", x); cursor.setAttribute("visibility", "visible");
      readout.textContent = lines.join("\n");
      readout.style.display = "block";
    });
    svg.addEventListener("mouseleave", function () {
      cursor.setAttribute("visibility", "hidden"); readout.style.display = "none";
    });
  }

  function setUpStepSelector() {
    var select = document.getElementById("step-select");
    if (!select) { return; }
    select.addEventListener("change", function () {
      var chosen = select.value;
      document.querySelectorAll(".sample").forEach(function (card) {
        card.style.display = (chosen === "all" || card.getAttribute("data-step") === chosen) ? "" : "none";
      });
    });
  }

  try {
    var plots = document.querySelectorAll(".plot");
    plots.forEach(setUpPlot);
    setUpStepSelector();
    var ready = document.createElement("div");
    ready.id = "opd-report-ready";
    ready.textContent = "report ready: " + plots.length + " plots, " +
      document.querySelectorAll(".sample").length + " samples";
    status.appendChild(ready);
  } catch (error) {
    fail(error);
  }
})();
"""
