// cxr-search page behaviour: image query by drag-and-drop or file picker. Written for this project;
// no framework, no third-party code. Everything else works without JavaScript.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  var form = document.getElementById("image-form");
  var input = document.getElementById("image-file");
  var drop = document.getElementById("drop");
  if (!form || !input || !drop) {
    return;
  }
  function submitWith(files) {
    if (!files || files.length === 0) {
      return;
    }
    if (files !== input.files) {
      var dt = new DataTransfer();
      dt.items.add(files[0]);
      input.files = dt.files;
    }
    drop.classList.add("busy");
    form.submit();
  }
  input.addEventListener("change", function () {
    submitWith(input.files);
  });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (ev) {
      ev.preventDefault();
      drop.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (ev) {
      ev.preventDefault();
      drop.classList.remove("over");
    });
  });
  drop.addEventListener("drop", function (ev) {
    submitWith(ev.dataTransfer ? ev.dataTransfer.files : null);
  });
  // The page's other forms stay plain HTML; a dropped file anywhere else must not navigate away.
  window.addEventListener("dragover", function (ev) { ev.preventDefault(); });
  window.addEventListener("drop", function (ev) { ev.preventDefault(); });
});
