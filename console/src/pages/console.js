// The outbox console's own script: a live region whose refresh fails (the database, the
// broker or the console is down, or the login expired) says so, instead of showing old
// numbers as if they were current. htmx keeps the last content when a refresh fails.
(function () {
  function banner(text) {
    var live = document.getElementById("live");
    if (!live) { return; }
    var note = document.getElementById("stale");
    if (!note) {
      note = document.createElement("p");
      note.id = "stale";
      note.className = "flag";
      note.setAttribute("role", "alert");
      live.parentNode.insertBefore(note, live);
    }
    note.textContent = text;
    live.classList.add("stale-content");
  }
  function fresh() {
    var note = document.getElementById("stale");
    if (note) { note.remove(); }
    var live = document.getElementById("live");
    if (live) { live.classList.remove("stale-content"); }
  }
  var since = null;
  function failed(why) {
    if (!since) { since = new Date(); }
    banner("Not refreshed since " + since.toLocaleTimeString() + " (" + why + "): what is shown may be out of date.");
  }
  document.addEventListener("htmx:responseError", function (e) {
    failed("the console answered " + e.detail.xhr.status);
  });
  document.addEventListener("htmx:sendError", function () { failed("the console cannot be reached"); });
  document.addEventListener("htmx:timeout", function () { failed("no answer"); });
  document.addEventListener("htmx:afterSwap", function () { since = null; fresh(); });
})();
