// Renders every figure of the refusal-atlas report from the JSON blocks embedded in the page.
// Marks <body> with data-rendered (figures drawn) and data-errors (failures) for automated checks.
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); document.body.dataset.errors = errors.length; });
  function render() {
    var nodes = document.querySelectorAll("div.figure[data-fig]");
    var pending = nodes.length, drawn = 0;
    document.body.dataset.figures = nodes.length;
    if (!pending) { document.body.dataset.rendered = 0; return; }
    nodes.forEach(function (div) {
      try {
        var spec = JSON.parse(document.getElementById(div.dataset.fig).textContent);
        var config = { responsive: true, displaylogo: false };
        Plotly.newPlot(div, spec.data || [], spec.layout || {}, config).then(function () {
          drawn += 1; document.body.dataset.rendered = drawn;
        }, function (err) {
          errors.push(String(err)); document.body.dataset.errors = errors.length;
        });
      } catch (err) {
        errors.push(String(err)); document.body.dataset.errors = errors.length;
      }
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", render); } else { render(); }
})();
