// Progressive enhancement only: every page works without this file.
(function () {
  "use strict";

  // Job page: follow the job through the API (the session signs the request) and move the
  // progress bar; when it finishes, reload so the server renders the result and its links.
  function followJob(section) {
    var url = section.getAttribute("data-job-url");
    var bar = document.getElementById("job-progress");
    var percent = document.getElementById("job-percent");
    var state = document.getElementById("job-state");
    var message = document.getElementById("job-message");
    function poll() {
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : Promise.reject(response.status); })
        .then(function (job) {
          bar.value = job.progress;
          bar.textContent = percent.textContent = Math.round(job.progress * 100) + "%";
          state.textContent = job.state;
          state.setAttribute("data-state", job.state);
          message.textContent = job.message || "";
          if (job.state === "succeeded" || job.state === "failed" || job.state === "cancelled") {
            window.location.reload();
          } else {
            window.setTimeout(poll, 500);
          }
        })
        .catch(function () { window.setTimeout(poll, 2000); });
    }
    poll();
  }

  // Compose / merge: "Add another adapter" copies the last row with the next field numbers.
  function enableAddRow(button) {
    var rows = button.parentNode.querySelector(".adapter-rows");
    var max = parseInt(rows.getAttribute("data-max-rows"), 10);
    button.hidden = false;
    button.addEventListener("click", function () {
      var all = rows.querySelectorAll(".adapter-row");
      if (all.length >= max) { return; }
      var index = all.length;
      var row = all[all.length - 1].cloneNode(true);
      row.querySelectorAll("[id], [for], [name]").forEach(function (element) {
        ["id", "for", "name"].forEach(function (attribute) {
          var value = element.getAttribute(attribute);
          if (value) { element.setAttribute(attribute, value.replace(/_\d+$/, "_" + index)); }
        });
      });
      row.querySelectorAll("label").forEach(function (label) {
        label.textContent = label.textContent.replace(/\d+$/, String(index + 1));
      });
      row.querySelectorAll(".errors").forEach(function (error) { error.remove(); });
      row.querySelector("input[list]").value = "";
      row.querySelector("input[type=number]").value = "1";
      rows.appendChild(row);
      row.querySelector("input").focus();
      if (index + 1 >= max) { button.hidden = true; }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-job-url]").forEach(followJob);
    document.querySelectorAll("[data-add-adapter-row]").forEach(enableAddRow);
  });
})();
