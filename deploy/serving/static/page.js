// The vismem page: a client of this server's public API (/v1/info, /v1/classify, /v1/items, /v1/admin/remove).
// Every text from the server is put in the page as text (textContent), never as HTML.
"use strict";

(function () {
  var $ = function (id) { return document.getElementById(id); };
  var state = { info: null, query: null, seq: 0 };

  // ---- talking to the server -------------------------------------------------------------------
  function api(method, path, body, token) {
    var headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers["Authorization"] = "Bearer " + token;
    return fetch(path, { method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body) })
      .then(function (r) {
        return r.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
          if (!r.ok) {
            var why = data && typeof data.error === "string" ? data.error : (text || r.statusText);
            throw new Error("HTTP " + r.status + ": " + why);
          }
          return data;
        });
      });
  }

  function itemPath(id) { return "v1/items/" + encodeURIComponent(id); }
  function imageUrl(id, size) { return itemPath(id) + "/image?size=" + size; }

  // ---- messages: one line of error, one line of status ------------------------------------------
  function showError(err) {
    var text = String(err && err.message ? err.message : err).replace(/\s+/g, " ").trim();
    $("error").textContent = text;
    $("error").title = text;
    $("error").hidden = false;
    $("result").setAttribute("data-state", "error");
  }
  function clearError() { $("error").hidden = true; $("error").textContent = ""; }
  function status(text) { $("status").textContent = text; }

  // ---- start: what this memory and server offer -------------------------------------------------
  function fillSelect(select, values, chosen) {
    select.textContent = "";
    values.forEach(function (v) {
      var o = document.createElement("option");
      o.value = v; o.textContent = v; o.selected = v === chosen;
      select.appendChild(o);
    });
  }

  function describe(info) {
    state.info = info;
    var enc = info.encoder && info.encoder.name ? info.encoder.name : "no encoder recorded";
    $("memory-info").textContent = "Memory " + info.memory + ", version " + info.version + ": " +
      info.items + " items, " + info.classes.length + " classes, " + info.dim + "-d embeddings (" + enc + ").";
  }

  function start() {
    Promise.all([api("GET", "v1/info"), api("GET", "openapi.json")]).then(function (got) {
      var info = got[0], props = got[1].components.schemas.ClassifyQuery.properties;
      describe(info);
      fillSelect($("method"), props.method.enum, props.method.default);
      fillSelect($("ties"), props.ties.enum, props.ties.default);
      $("k").max = info.limits.max_k;
      $("k").value = Math.min(10, info.limits.max_k);
      if (!info.serving_encoder) {
        $("kind-upload").disabled = true; $("image-file").disabled = true;
        $("kind-item").checked = true;
        $("upload-note").textContent = "This server takes no images: start it with --encoder to upload them.";
      }
      if (!info.admin_enabled) {
        $("admin-token").disabled = true;
        $("admin-note").textContent = "Admin endpoints are disabled on this server (no admin token).";
      }
      document.body.setAttribute("data-ready", "true");
    }).catch(showError);
  }

  // ---- the query: an uploaded file or a stored item ---------------------------------------------
  function readUpload(file) {
    return new Promise(function (resolve, reject) {
      var reader = new FileReader();
      reader.onload = function () { resolve(String(reader.result).split(",", 2)[1] || ""); };
      reader.onerror = function () { reject(new Error("cannot read " + file.name)); };
      reader.readAsDataURL(file);
    });
  }

  function loadQuery() {
    if ($("kind-upload").checked) {
      var file = $("image-file").files[0];
      if (!file) return Promise.reject(new Error("choose an image file to upload"));
      if (state.query && state.query.file === file) return Promise.resolve(state.query);
      return readUpload(file).then(function (b64) {
        if (state.query && state.query.preview) URL.revokeObjectURL(state.query.preview);
        state.query = { kind: "upload", file: file, images: [b64], preview: URL.createObjectURL(file),
                        caption: "uploaded: " + file.name };
        return state.query;
      });
    }
    var id = $("item-id").value.trim();
    if (!id) return Promise.reject(new Error("type the id of a stored item"));
    if (state.query && state.query.kind === "item" && state.query.id === id) return Promise.resolve(state.query);
    // Fetched once: the embedding stays the query even after the item itself is removed.
    return api("GET", itemPath(id)).then(function (item) {
      state.query = { kind: "item", id: id, embeddings: [item.embedding], preview: item.has_image ? imageUrl(id, 224) : "",
                      caption: "stored item " + id + " (" + (item.label_name || "no label") + ")" };
      return state.query;
    });
  }

  function voteSettings() {
    var body = { k: Number($("k").value), method: $("method").value, ties: $("ties").value, neighbours: true };
    var below = $("abstain-below").value.trim();
    if (below !== "") body.abstain_below = Number(below);
    return body;
  }

  // ---- classify and show why ----------------------------------------------------------------------
  function classify() {
    var seq = ++state.seq;
    clearError();
    $("result").setAttribute("data-state", "loading");
    status("Classifying…");
    return loadQuery().then(function (q) {
      var body = voteSettings();
      if (q.images) body.images = q.images; else body.embeddings = q.embeddings;
      return api("POST", "v1/classify", body).then(function (res) {
        if (seq === state.seq) render(q, res, seq);  // a newer request supersedes this answer
      });
    }).catch(function (err) {
      if (seq === state.seq) { status(""); showError(err); }
    });
  }

  function fmt(x, digits) { return Number(x).toFixed(digits); }

  function render(q, res, seq) {
    var r = res.results[0], names = Object.keys(r.scores);
    var result = $("result");
    var img = $("query-image");
    img.hidden = !q.preview;
    if (q.preview) img.src = q.preview;
    $("query-caption").textContent = q.caption;
    $("decision").textContent = r.abstained ? "abstained (no label)" : (r.label === undefined || r.label === null ? "none (no neighbour could vote)" : r.label);
    $("confidence").textContent = fmt(100 * r.confidence, 1) + " % of the vote";
    $("settings").textContent = res.method + " voting, k = " + res.k + ", ties: " + res.ties + "; memory version " + res.version;

    var total = names.reduce(function (s, c) { return s + r.scores[c]; }, 0);
    var rows = $("scores").tBodies[0];
    rows.textContent = "";
    names.sort(function (a, b) { return r.scores[b] - r.scores[a]; }).forEach(function (c) {
      var tr = rows.insertRow();
      if (c === r.label) tr.className = "voted";
      cell(tr, c);
      cell(tr, fmt(r.scores[c], 4), "num");
      cell(tr, total > 0 ? fmt(100 * r.scores[c] / total, 1) + " %" : "–", "num");
    });
    renderNeighbours(r.neighbours || []);

    result.setAttribute("data-version", res.version);
    result.setAttribute("data-method", res.method);
    result.setAttribute("data-k", res.k);
    result.setAttribute("data-ties", res.ties);
    result.setAttribute("data-label", r.label === undefined || r.label === null ? "" : r.label);
    result.setAttribute("data-label-index", r.label_index);
    result.setAttribute("data-confidence", r.confidence);
    result.setAttribute("data-seq", seq);
    result.setAttribute("data-state", "done");
    result.hidden = false;
    status("");
    state.last = r;
    if (state.info && res.version !== state.info.version) {  // a new version: its counts in the header
      api("GET", "v1/info").then(describe).catch(showError);
    }
  }

  function cell(tr, text, cls) {
    var td = tr.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function renderNeighbours(neighbours) {
    var admin = Boolean(state.info && state.info.admin_enabled && $("admin-token").value.trim());
    $("neighbours").classList.toggle("admin", admin);
    var rows = $("neighbours").tBodies[0];
    rows.textContent = "";
    neighbours.forEach(function (n, i) {
      var tr = rows.insertRow();
      tr.setAttribute("data-id", n.id);
      cell(tr, String(i + 1), "num");
      var td = tr.insertCell();
      var img = document.createElement("img");
      img.width = 56; img.height = 56; img.loading = "lazy";
      img.alt = "image of item " + n.id + " (" + (n.label_name || "no label") + ")";
      img.onerror = function () {  // no uri, or the file cannot be read: say so in place of the picture
        var s = document.createElement("span");
        s.className = "noimg"; s.textContent = "no image"; s.title = "item " + n.id + " has no retrievable image";
        img.replaceWith(s);
      };
      img.src = imageUrl(n.id, 112);
      td.appendChild(img);
      cell(tr, n.id, "id");
      cell(tr, n.label_name === null ? String(n.label) : n.label_name, "label");
      cell(tr, fmt(n.sim, 4), "num");
      var act = tr.insertCell();
      act.className = "admin-col";
      if (admin) {
        var b = document.createElement("button");
        b.type = "button"; b.textContent = "Remove"; b.className = "remove";
        b.setAttribute("aria-label", "Remove item " + n.id + " from the memory");
        b.onclick = function () { removeItem(n.id, b); };
        act.appendChild(b);
      }
    });
  }

  // ---- admin: remove a neighbour, then classify again -------------------------------------------
  function removeItem(id, button) {
    button.disabled = true;
    clearError();
    status("Removing " + id + "…");
    $("result").setAttribute("data-state", "loading");
    api("POST", "v1/admin/remove", { ids: [id], reason: "removed from the vismem page" }, $("admin-token").value.trim())
      .then(function (out) {
        return classify().then(function () {
          if ($("error").hidden) status("Removed " + id + ": the memory is now version " + out.version + ".");
        });
      })
      .catch(function (err) { button.disabled = false; status(""); showError(err); });
  }

  // ---- wiring ------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", function () {
    $("query-form").addEventListener("submit", function (e) { e.preventDefault(); classify(); });
    $("image-file").addEventListener("change", function () {
      if ($("image-file").files.length) { $("kind-upload").checked = true; classify(); }
    });
    $("item-id").addEventListener("input", function () { $("kind-item").checked = true; });
    ["method", "ties", "k", "abstain-below"].forEach(function (id) {
      $(id).addEventListener("change", function () { if (state.query) classify(); });
    });
    $("admin-token").addEventListener("input", function () {
      if (state.last) renderNeighbours(state.last.neighbours || []);
    });
    start();
  });
})();
