// The operator page's live refresh: GET state every few seconds, rebuild the tables.
// Progressive enhancement only: without it the server-rendered page reloads itself
// (<noscript> refresh). Every value goes in as text, never as markup.
(function () {
  "use strict";
  var main = document.querySelector("main[data-state]");
  if (!main) { return; } // the login form: nothing to refresh
  var url = main.getAttribute("data-state");
  var every = Number(main.getAttribute("data-every")) || 2000;
  var DASH = "\u2014";
  var lastStatus = {};

  function when(iso) { return iso ? String(iso).replace("T", " ").replace(/Z$/, "") : DASH; }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      if (attrs[name] !== "" && attrs[name] !== null && attrs[name] !== undefined) {
        node.setAttribute(name, String(attrs[name]));
      }
    });
    if (text !== undefined) { node.textContent = String(text); }
    return node;
  }

  function cell(col, text, cls, title) {
    return el("td", { "data-col": col, "class": cls || "", "title": title || "" }, text);
  }

  function fill(id, rows, empty, cols) {
    var body = document.getElementById(id);
    if (!body) { return; }
    var fresh = document.createDocumentFragment();
    if (!rows.length) {
      var tr = el("tr", { "class": "empty" });
      tr.appendChild(el("td", { colspan: cols }, empty));
      fresh.appendChild(tr);
    }
    rows.forEach(function (tr) { fresh.appendChild(tr); });
    body.replaceChildren(fresh);
  }

  function keyRow(k) {
    var tr = el("tr", { "data-key": k.key });
    var check = DASH;
    if (k.last_check) {
      check = when(k.last_check.at) + " " + [k.last_check.verdict, k.last_check.reason]
        .filter(Boolean).join(" ");
    }
    var why = k.status_reason && k.status_by ? k.status_reason + " (" + k.status_by + ")"
      : (k.status_reason || k.status_by || "");
    [
      cell("key", k.key, "key", k.api_key),
      cell("label", k.label || DASH),
      cell("subaccount", k.subaccount),
      cell("status", k.status, "status status-" + k.status, why),
      cell("status_since", when(k.status_since), "time"),
      cell("last_verdict", k.last_verdict || DASH),
      cell("last_checked_at", when(k.last_checked_at), "time"),
      cell("last_check", check, "time"),
      cell("read_only", k.read_only ? "read-only" : "trading"),
      cell("origin", k.origin),
      cell("outstanding", k.outstanding || 0, "num"),
    ].forEach(function (td) { tr.appendChild(td); });
    if (lastStatus[k.key] !== undefined && lastStatus[k.key] !== k.status) {
      tr.className = "changed";
    }
    lastStatus[k.key] = k.status;
    return tr;
  }

  function activityRow(r) {
    var tr = el("tr", { "data-identity": r.identity });
    [
      cell("identity", r.identity),
      cell("copies", r.copies, "num"),
      cell("signatures", r.signatures, "num"),
      cell("refused", r.refused, "num"),
      cell("keys", (r.keys || []).join(", ")),
      cell("last_at", when(r.last_at)),
    ].forEach(function (td) { tr.appendChild(td); });
    return tr;
  }

  function historyRow(c) {
    var tr = el("tr", { "data-seq": c.seq });
    var note = c.deleted ? "deleted" : (c.event === "rotated" ? "rotated to " + c.api_key : "");
    [
      cell("at", when(c.at)),
      cell("key", c.key),
      cell("status", c.status, "status status-" + c.status),
      cell("note", note),
    ].forEach(function (td) { tr.appendChild(td); });
    return tr;
  }

  function rotationRow(r) {
    var tr = el("tr", { "data-rotation": r.key });
    var next = r.next ? r.next.role + " " + r.next.api_key + " (" + r.next.status + ")" : DASH;
    var previous = r.previous ? r.previous.api_key + " (" + r.previous.status + ")" : DASH;
    var last = r.last_event ? when(r.last_event.at) + " " + r.last_event.event : DASH;
    [
      cell("key", r.key, "key"),
      cell("api_key", r.api_key, "key"),
      cell("next", next),
      cell("previous", previous),
      cell("last_event", last, "time"),
      cell("advice", r.advice || DASH),
    ].forEach(function (td) { tr.appendChild(td); });
    return tr;
  }

  function health(state) {
    var items = state.health || {};
    var words = {
      vault: items.vault || "unknown",
      exchange: items.exchange || "unknown",
      leader: state.leader || "none",
    };
    Object.keys(words).forEach(function (name) {
      var dd = document.querySelector('[data-health="' + name + '"] dd');
      if (!dd) { return; }
      dd.textContent = words[name];
      var good = name === "leader" ? Boolean(state.leader) : words[name] === "ok";
      dd.className = good ? "ok" : "warn";
    });
    var out = document.querySelector('[data-health="outstanding"] dd');
    if (out) { out.textContent = String(state.outstanding_total || 0); }
  }

  function errors(state) {
    var box = document.getElementById("errors");
    if (!box) { return; }
    var names = Object.keys(state.errors || {});
    if (!names.length) { box.replaceChildren(); return; }
    var ul = el("ul");
    names.forEach(function (name) { ul.appendChild(el("li", {}, name + ": " + state.errors[name])); });
    box.replaceChildren(ul);
  }

  function render(state) {
    health(state);
    errors(state);
    fill("keys-body", (state.keys || []).map(keyRow), "No keys stored.", 11);
    fill("rotations-body", (state.rotations || []).map(rotationRow),
      "No rotation, standby or failover.", 6);
    fill("activity-body", (state.activity || []).map(activityRow),
      "No handouts in the last hour.", 6);
    fill("history-body", (state.history || []).map(historyRow), "No status changes yet.", 4);
    var updated = document.getElementById("updated");
    if (updated) { updated.textContent = when(state.now); }
  }

  function live(on) {
    var badge = document.getElementById("live");
    if (badge) { badge.className = "live " + (on ? "on" : "off"); }
  }

  document.querySelectorAll("#keys-body tr[data-key]").forEach(function (tr) {
    var status = tr.querySelector('[data-col="status"]');
    if (status) { lastStatus[tr.getAttribute("data-key")] = status.textContent; }
  });

  function refresh() {
    fetch(url, { credentials: "same-origin", cache: "no-store",
      headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        if (!response.ok) { throw new Error("state answered " + response.status); }
        return response.json();
      })
      .then(function (state) { if (state) { render(state); live(true); } })
      .catch(function () { live(false); })
      .then(function () { window.setTimeout(refresh, every); });
  }

  live(true);
  window.setTimeout(refresh, every);
})();
