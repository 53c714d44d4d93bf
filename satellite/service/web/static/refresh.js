// Reload the page every data-refresh seconds, unless the reader is typing or the tab is hidden.
(function () {
  var seconds = Number(document.body.dataset.refresh || 0);
  if (!seconds) return;
  setInterval(function () {
    var el = document.activeElement;
    var typing = el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
    if (!typing && document.visibilityState === "visible") location.reload();
  }, seconds * 1000);
})();
