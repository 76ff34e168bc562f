"use strict";
// The gallery's script: builds the page from the JSON in #gallery-data. Every value from the index
// is set as text (textContent, attributes of our own names): nothing in the data is ever parsed
// as HTML.
(function () {
  const data = JSON.parse(document.getElementById("gallery-data").textContent);
  const loras = data.loras;
  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  // Cards are made when first shown, CHUNK at a time as the end of the grid scrolls into view.
  const CHUNK = 120;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  const fold = (s) => String(s).normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase();

  function humanSize(b) {
    if (b < 1024) return b + " B";
    if (b < 1048576) return (b / 1024).toFixed(1) + " KiB";
    if (b < 1073741824) return (b / 1048576).toFixed(1) + " MiB";
    return (b / 1073741824).toFixed(2) + " GiB";
  }

  for (const l of loras) {
    const user = l.user && typeof l.user === "object" ? Object.values(l.user).filter((v) => typeof v === "string") : [];
    l.search = fold([l.name, l.alias, l.file, l.base, l.kind, l.note, l.sha256, l.autov2, l.addnet, l.autov3]
      .concat(l.triggers, l.top_tags, l.tags, user).filter((v) => v).join("\n"));
  }

  function fillSelect(select, values) {
    for (const v of Array.from(new Set(values)).sort((a, b) => a.localeCompare(b))) {
      const o = el("option", null, v);
      o.value = v;
      select.appendChild(o);
    }
  }
  fillSelect($("base"), loras.map((l) => l.base || "unknown"));
  fillSelect($("kind"), loras.map((l) => l.kind || "unknown"));
  fillSelect($("tag"), loras.flatMap((l) => l.tags));

  const sorts = {
    name: (a, b) => a.name.localeCompare(b.name) || a.id - b.id,
    added: (a, b) => b.added - a.added || b.id - a.id,
    size: (a, b) => b.size - a.size || a.name.localeCompare(b.name),
    rank: (a, b) => (b.rank ?? -1) - (a.rank ?? -1) || a.name.localeCompare(b.name),
    base: (a, b) => (a.base || "").localeCompare(b.base || "") || a.name.localeCompare(b.name),
  };

  const cards = new Map();
  let shown = [];
  let rendered = 0;
  const sentinel = el("div");
  sentinel.id = "sentinel";
  const observer = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) renderMore(); }, { rootMargin: "1200px" })
    : null;

  function placeholder(l) {
    const p = el("div", "thumb placeholder");
    const initial = el("span", "initial", Array.from(l.name)[0] || "?");
    p.appendChild(initial);
    p.appendChild(document.createTextNode(l.preview_problem ? "preview unreadable" : "no preview"));
    return p;
  }

  function image(l, cls) {
    if (!l.thumb) return placeholder(l);
    const img = el("img", cls);
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = "";
    img.src = l.thumb;
    return img;
  }

  function card(l) {
    let c = cards.get(l.id);
    if (c) return c;
    c = el("article", "card");
    c.tabIndex = 0;
    c.setAttribute("role", "button");
    c.dataset.id = l.id;
    c.appendChild(image(l, "thumb"));
    const body = el("div", "body");
    body.appendChild(el("h2", "name", l.name));
    if (l.alias && l.alias !== l.name) body.appendChild(el("div", "alias", l.alias));
    const badges = el("div", "badges");
    badges.appendChild(el("span", "badge base", l.base || "unknown"));
    badges.appendChild(el("span", "badge kind", l.kind || "unknown"));
    if (l.rank !== null) badges.appendChild(el("span", "badge", "rank " + l.rank));
    badges.appendChild(el("span", "badge", humanSize(l.size)));
    body.appendChild(badges);
    if (l.triggers.length || l.tags.length) {
      const chips = el("div", "chips");
      for (const t of l.triggers.slice(0, 4)) chips.appendChild(el("span", "chip trigger", t));
      for (const t of l.tags) chips.appendChild(el("span", "chip tag", t));
      body.appendChild(chips);
    }
    c.appendChild(body);
    c.addEventListener("click", () => openDetail(l));
    c.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openDetail(l); }
    });
    cards.set(l.id, c);
    return c;
  }

  function renderMore() {
    const next = shown.slice(rendered, rendered + CHUNK);
    if (!next.length) return;
    const frag = document.createDocumentFragment();
    for (const l of next) frag.appendChild(card(l));
    rendered += next.length;
    grid.insertBefore(frag, sentinel);
  }

  function apply() {
    const words = fold($("search").value).split(/\s+/).filter((w) => w);
    const base = $("base").value, kind = $("kind").value, tag = $("tag").value;
    const noPreview = $("missing-preview").checked;
    shown = loras.filter((l) =>
      (!base || (l.base || "unknown") === base) &&
      (!kind || (l.kind || "unknown") === kind) &&
      (!tag || l.tags.includes(tag)) &&
      (!noPreview || !l.thumb) &&
      words.every((w) => l.search.includes(w)));
    shown.sort(sorts[$("sort").value] || sorts.name);
    if (observer) observer.unobserve(sentinel);
    grid.replaceChildren(sentinel);
    rendered = 0;
    renderMore();
    if (observer) observer.observe(sentinel);
    else while (rendered < shown.length) renderMore();
    grid.dataset.shown = String(shown.length);
    $("count").textContent = shown.length === loras.length
      ? loras.length + (loras.length === 1 ? " LoRA" : " LoRAs")
      : shown.length + " of " + loras.length + " shown";
    $("empty").hidden = shown.length > 0 || loras.length === 0;
  }

  function row(table, key, value, cls) {
    if (value === undefined || value === null || value === "" || (Array.isArray(value) && !value.length)) return;
    const tr = el("tr");
    tr.appendChild(el("th", null, key));
    const td = el("td", cls || null, Array.isArray(value) ? value.join(", ") : value);
    tr.appendChild(td);
    table.appendChild(tr);
  }

  function section(parent, title, fill) {
    const table = el("table");
    fill(table);
    if (!table.rows.length) return;
    parent.appendChild(el("h3", null, title));
    parent.appendChild(table);
  }

  function copy(text, status) {
    const done = () => { status.textContent = "Copied"; setTimeout(() => { status.textContent = ""; }, 1500); };
    const fallback = () => {
      const area = el("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      try { document.execCommand("copy"); done(); } catch (e) { status.textContent = "Select and copy by hand"; }
      area.remove();
    };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
    else fallback();
  }

  function openDetail(l) {
    $("detail-name").textContent = l.name;
    const body = $("detail-body");
    body.replaceChildren();
    const side = el("div", "side");
    side.appendChild(image(l, null));
    body.appendChild(side);
    const main = el("div", "main");
    const prompt = el("div", "prompt");
    const code = el("code", null, l.prompt);
    const button = el("button", null, "Copy");
    button.type = "button";
    const status = el("span", "copied");
    button.addEventListener("click", () => copy(l.prompt, status));
    prompt.appendChild(code);
    prompt.appendChild(button);
    prompt.appendChild(status);
    main.appendChild(prompt);
    section(main, "File", (t) => {
      row(t, "alias", l.alias);
      row(t, "file", l.file);
      row(t, "path", l.path);
      row(t, "base model", l.base);
      row(t, "kind", l.kind);
      row(t, "format", l.format);
      row(t, "rank", l.rank_min !== null && l.rank_min !== l.rank ? l.rank_min + "–" + l.rank : l.rank);
      row(t, "alpha", l.alpha);
      row(t, "dtype", l.dtype);
      row(t, "modules", l.modules);
      row(t, "components", l.components);
      row(t, "size", humanSize(l.size) + " (" + l.size + " bytes)");
      row(t, "modified", new Date(l.modified * 1000).toISOString().slice(0, 16).replace("T", " "));
      row(t, "preview", l.preview);
      row(t, "preview problem", l.preview_problem, "problem");
      row(t, "trigger words", l.triggers);
      row(t, "training tags", l.top_tags);
      row(t, "tags", l.tags);
      row(t, "note", l.note);
      row(t, "sidecars", l.sidecars);
      for (const w of l.warnings) row(t, "warning", w, "problem");
    });
    section(main, "Hashes", (t) => {
      row(t, "sha256", l.sha256, "hash");
      row(t, "AutoV2", l.autov2, "hash");
      row(t, "addnet (data sha256)", l.addnet, "hash");
      row(t, "AutoV3", l.autov3, "hash");
    });
    section(main, "Sidecar (A1111 <stem>.json)", (t) => {
      if (l.user && typeof l.user === "object") {
        for (const [k, v] of Object.entries(l.user)) row(t, k, typeof v === "string" ? v : JSON.stringify(v));
      }
    });
    section(main, "Metadata", (t) => {
      for (const [k, v] of Object.entries(l.metadata)) row(t, k, v);
    });
    body.appendChild(main);
    const dialog = $("detail");
    if (typeof dialog.showModal === "function") { if (!dialog.open) dialog.showModal(); }
    else dialog.setAttribute("open", "");
  }

  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) $("detail").close(); });
  for (const id of ["search", "base", "kind", "tag", "missing-preview", "sort"]) {
    $(id).addEventListener(id === "search" ? "input" : "change", apply);
  }
  apply();
})();
