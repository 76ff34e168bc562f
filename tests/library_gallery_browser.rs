//! The gallery page in a real headless browser (Chromium from the distribution's packages): it
//! loads without console errors under its own Content-Security-Policy, search and the filters
//! change what is shown, the detail view opens, and names and metadata that look like HTML are
//! shown as text and never run.
//!
//! How Chromium is driven: `--headless --dump-dom` on a file URL, with a virtual time budget so
//! timers run without waiting. The interactions run in a copy of the page (`harness.html`, beside
//! the real one so its thumbnails resolve) with two scripts added: one first in `<head>` that
//! records window errors, rejected promises and `console.error` calls, and one after the page's
//! own script that types into the search box, changes filters, opens a card, and writes what it
//! saw as JSON into a `<pre>` that the dumped DOM carries back. The copy leaves out the page's CSP
//! (which admits only the page's own script, by hash): the unmodified page is checked separately
//! with Chromium's console log on stderr.
//!
//! Without a browser the tests print a notice and pass, unless `LORATOOL_REQUIRE_BROWSER=1`
//! (`.ci/run` installs Chromium and sets it).

mod library_support;

use library_support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `chromium`, `chromium-browser` or `google-chrome` on PATH.
fn browser() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        });
    if found.is_none() {
        let required = std::env::var("LORATOOL_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "LORATOOL_REQUIRE_BROWSER=1 but no chromium, chromium-browser or google-chrome on PATH"
        );
        eprintln!("note: no Chromium found; the gallery's browser tests are skipped");
    }
    found
}

/// Runs headless Chromium on `page` and returns (the dumped DOM, stderr).
fn dump_dom(bin: &Path, page: &Path, profile: &Path) -> (String, String) {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The text of a serialized DOM's text node (`&lt;`, `&gt;`, `&amp;`, `&nbsp;` undone).
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

const XSS_NAME: &str = "<img src=x onerror=window.__pwned=1>";
const XSS_ALIAS: &str = "</script><script>window.__pwned=2</script>";
const XSS_META: &str = "<svg onload=window.__pwned=3><b>bold</b>";

/// A collection of five LoRAs over three base models with previews, a tag and names that look
/// like HTML, and its gallery.
fn site(t: &Path) -> PathBuf {
    let c = t.join("c");
    let db = t.join("lib.db");
    lora_named(
        &c,
        "loras/sd1_kohya_lora.safetensors",
        "red_style",
        &[("ss_output_name", "redstyle_v2")],
    );
    lora_named(&c, "loras/sd1_locon.safetensors", "ゆめ_portrait", &[]);
    lora_named(&c, "loras/sdxl_loha.safetensors", "xl_landscape", &[]);
    lora_named(&c, "loras/sdxl_kohya_lora.safetensors", "xl_castle", &[]);
    lora_named(
        &c,
        "loras/sd1_loha.safetensors",
        XSS_NAME,
        &[
            ("ss_output_name", XSS_ALIAS),
            ("ss_training_comment", XSS_META),
        ],
    );
    write_image(&c.join("red_style.png"), 512, 768, [220, 60, 60]);
    write_image(&c.join("xl_landscape.preview.jpg"), 768, 512, [60, 160, 90]);
    write_image(&c.join("ゆめ_portrait.webp"), 300, 400, [90, 90, 220]);
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", "xl_castle", "favourite"]);
    ok(&db, &["tag", "add", "red_style", "favourite"]);
    let out = t.join("site");
    ok(&db, &["gallery", "-o", out.to_str().unwrap(), "--quiet"]);
    out
}

#[test]
fn the_page_loads_under_its_csp_without_console_errors() {
    let Some(bin) = browser() else { return };
    let t = tempfile::tempdir().unwrap();
    let out = site(t.path());
    let (dom, log) = dump_dom(&bin, &out.join("index.html"), &t.path().join("profile"));
    // The script ran (the CSP admits it by its hash) and showed every card.
    assert!(dom.contains(r#"data-shown="5""#), "{dom}\n{log}");
    assert_eq!(dom.matches(r#"<article class="card""#).count(), 5, "{dom}");
    let console: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Refused to") || l.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    // Thumbnails are in the page; the card without a preview has the placeholder.
    assert_eq!(dom.matches(r#"class="thumb""#).count(), 3, "{dom}");
    assert_eq!(
        dom.matches(r#"class="thumb placeholder""#).count(),
        2,
        "{dom}"
    );
}

/// Added first in `<head>`: records what would show in the console as errors.
const RECORDER: &str = r#"<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push("error: " + (e.message || e.type)), true);
window.addEventListener("unhandledrejection", (e) => window.__errors.push("rejection: " + e.reason));
const __consoleError = console.error;
console.error = function (...args) { window.__errors.push("console.error: " + args.join(" ")); __consoleError.apply(console, args); };
</script>"#;

/// Added after the page's script: drives the page and reports.
const DRIVER: &str = r##"<script>
window.addEventListener("load", () => setTimeout(() => {
  const $ = (id) => document.getElementById(id);
  const shown = () => Number($("grid").dataset.shown);
  const names = () => Array.from(document.querySelectorAll("#grid .card .name")).map((e) => e.textContent);
  const set = (id, value, type) => {
    const e = $(id);
    if (e.type === "checkbox") e.checked = value; else e.value = value;
    e.dispatchEvent(new Event(type, { bubbles: true }));
  };
  const r = { initial: shown(), initial_names: names() };
  set("search", "XL", "input");
  r.search_xl = names();
  set("search", "redstyle", "input");
  r.search_alias = names();
  set("search", "favourite castle", "input");
  r.search_two_words = names();
  set("search", "", "input");
  set("base", "sdxl", "change");
  r.base_sdxl = names();
  set("base", "", "change");
  set("kind", "locon", "change");
  r.kind_locon = names();
  set("kind", "", "change");
  set("tag", "favourite", "change");
  r.tag_favourite = names();
  set("tag", "", "change");
  set("missing-preview", true, "change");
  r.missing_preview = names();
  set("missing-preview", false, "change");
  set("sort", "size", "change");
  r.after_sort = shown();
  r.count_text = $("count").textContent;
  const xss = Array.from(document.querySelectorAll("#grid .card")).find((c) => c.querySelector(".name").textContent === NAME);
  r.xss_card = !!xss;
  if (xss) {
    r.xss_alias_text = xss.querySelector(".alias").textContent;
    xss.click();
    r.detail_open = $("detail").open;
    r.detail_title = $("detail-name").textContent;
    r.detail_has_meta = $("detail-body").textContent.includes(META);
    r.prompt = document.querySelector("#detail .prompt code").textContent;
    r.injected_elements = Array.from(document.querySelectorAll("img")).filter((i) => !i.getAttribute("src").startsWith("thumbs/")).length
      + document.querySelectorAll("svg, b, main script, dialog script").length;
  }
  setTimeout(() => {
    r.pwned = window.__pwned || 0;
    r.errors = window.__errors;
    const pre = document.createElement("pre");
    pre.id = "harness-result";
    pre.textContent = JSON.stringify(r);
    document.body.appendChild(pre);
  }, 500);
}, 100));
</script>"##;

#[test]
fn search_filters_and_details_work_and_html_in_the_data_never_runs() {
    let Some(bin) = browser() else { return };
    let t = tempfile::tempdir().unwrap();
    let out = site(t.path());
    let page = std::fs::read_to_string(out.join("index.html")).unwrap();
    let csp_start = page
        .find(r#"<meta http-equiv="Content-Security-Policy""#)
        .unwrap();
    let csp_end = csp_start + page[csp_start..].find('>').unwrap() + 1;
    // A JS string holding "</" could end the driver's own element.
    let js = |s: &str| serde_json::to_string(s).unwrap().replace("</", "<\\/");
    let driver = DRIVER
        .replace("NAME", &js(XSS_NAME))
        .replace("META", &js(XSS_META));
    let harness = format!(
        "{}{}{}",
        &page[..csp_start],
        RECORDER,
        &page[csp_end..].replacen("</body>", &format!("{driver}</body>"), 1)
    );
    let harness_path = out.join("harness.html");
    std::fs::write(&harness_path, harness).unwrap();

    let (dom, log) = dump_dom(&bin, &harness_path, &t.path().join("profile"));
    let open = r#"<pre id="harness-result">"#;
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("no result in the DOM:\n{dom}\n{log}"))
        + open.len();
    let end = start + dom[start..].find("</pre>").unwrap();
    let r: serde_json::Value = serde_json::from_str(&unescape(&dom[start..end])).unwrap();
    let names = |key: &str| -> Vec<String> {
        let mut v: Vec<String> = r[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {r}"))
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };

    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["initial"], 5, "{r}");
    assert_eq!(names("initial_names").len(), 5);
    assert_eq!(names("search_xl"), ["xl_castle", "xl_landscape"], "{r}");
    assert_eq!(names("search_alias"), ["red_style"], "{r}");
    assert_eq!(names("search_two_words"), ["xl_castle"], "{r}");
    assert_eq!(names("base_sdxl"), ["xl_castle", "xl_landscape"], "{r}");
    assert_eq!(names("kind_locon"), ["ゆめ_portrait"], "{r}");
    assert_eq!(names("tag_favourite"), ["red_style", "xl_castle"], "{r}");
    assert_eq!(names("missing_preview"), [XSS_NAME, "xl_castle"], "{r}");
    assert_eq!(r["after_sort"], 5);
    assert_eq!(r["count_text"], "5 LoRAs");
    // The HTML-looking name, alias and metadata are text, and nothing in them ran.
    assert_eq!(r["xss_card"], true, "{r}");
    assert_eq!(r["xss_alias_text"], XSS_ALIAS);
    assert_eq!(r["detail_open"], true);
    assert_eq!(r["detail_title"], XSS_NAME);
    assert_eq!(r["detail_has_meta"], true);
    assert_eq!(r["prompt"], format!("<lora:{XSS_ALIAS}:1>"));
    assert_eq!(r["injected_elements"], 0, "{r}");
    assert_eq!(r["pwned"], 0, "{r}");
}
