//! A static HTML feature browser, in the spirit of sae_vis, for a [`FeatureSet`].
//!
//! [`write_site`] writes into a local folder:
//!
//! | file | contents |
//! | --- | --- |
//! | `index.html` | the summary (SAE, hook, model, rows) and a table of every feature: id (a link to its page), times fired, frequency (density), max activation, top logit tokens, the centre token of its top example, a "dead" or "dense" marker (denser than `--max-density`), and the languages of its top examples when the features have them; a search box and a density limit filter the rows |
//! | `features/NNNNN.html` | one page per feature (ids zero-padded to the width of `d_sae - 1`, at least 5 digits): stats (with the languages of its top examples), activation histogram (inline SVG), logit effects, neighbours (links), top examples, then quantile samples by band |
//! | `style.css` | the shared style sheet |
//!
//! Every page is rendered here, in full, so the site opens from `file://` without a server and
//! shows without JavaScript. The one script, inline on the index, only filters and sorts the rows
//! already there: the search box matches a feature id exactly, or any part of a row's top logit
//! tokens or top-example token (case-insensitive); the density box hides features firing on more
//! than that percentage of tokens; the frequency and max headers sort. The state is kept in the
//! URL, so `index.html#q=TEXT&max-density=2&sort=freq&dir=asc` opens filtered and sorted.
//!
//! Escaping: corpus and token text is untrusted. Every string reaches the markup through `html`,
//! which escapes `& < > " '`, in text and attribute values alike. No data is written inside a
//! `<script>` element (so there is no JSON to escape), and the script reads only rows' `data-*`
//! attributes and writes only `hidden` and `textContent`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::ranking::is_dense;
use super::set::{Example, ExampleKind, FeatureSet, FeatureStats};

/// Writes the site into `out` (a local directory, created if needed); returns the path of `index.html`.
pub fn write_site(set: &FeatureSet, out: &Path, max_density: f64) -> Result<PathBuf> {
    let pages = out.join("features");
    std::fs::create_dir_all(&pages).with_context(|| format!("cannot create `{}`", pages.display()))?;
    let width = id_width(set.summary.d_sae.max(set.features.len()));
    write(&out.join("style.css"), STYLE)?;
    for f in &set.features {
        write(&pages.join(page_name(f.feature, width)), &feature_page(set, f, width))?;
    }
    // The index last: its presence means the pages it links to are there.
    let index = out.join("index.html");
    write(&index, &index_page(set, width, max_density))?;
    Ok(index)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write `{}`", path.display()))
}

/// Digits of the largest feature id, at least 5.
fn id_width(d_sae: usize) -> usize {
    d_sae.saturating_sub(1).to_string().len().max(5)
}

fn page_name(feature: u32, width: usize) -> String {
    format!("{feature:0width$}.html")
}

/// `s` escaped for HTML text and (quoted) attribute values.
fn html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A token as shown: newlines as "↵", tabs as "⇥", other control characters as their Unicode
/// control pictures; spaces stay (the `.tok` style keeps them with `white-space: pre`).
fn visible(token: &str) -> String {
    token
        .chars()
        .map(|c| match c {
            '\n' => '↵',
            '\t' => '⇥',
            c @ '\0'..='\x1f' => char::from_u32(0x2400 + c as u32).unwrap_or('�'),
            '\x7f' => '␡',
            c => c,
        })
        .collect()
}

/// A token span: escaped, whitespace visible, with optional extra classes and attributes
/// (`attrs` must already be escaped).
fn tok(token: &str, class: &str, attrs: &str) -> String {
    let class = if class.is_empty() { "tok".to_string() } else { format!("tok {class}") };
    format!(r#"<span class="{class}"{attrs}>{}</span>"#, html(&visible(token)))
}

fn num(x: f32) -> String {
    format!("{x:.3}")
}

/// A frequency as a percentage, small ones in scientific notation.
fn percent(f: f64) -> String {
    let p = f * 100.0;
    if p == 0.0 {
        "0".into()
    } else if p >= 0.01 {
        format!("{p:.3}%")
    } else {
        format!("{p:.2e}%")
    }
}

fn page(title: &str, css: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
         <link rel=\"stylesheet\" href=\"{css}\">\n</head>\n<body>\n{body}</body>\n</html>\n",
        html(title)
    )
}

fn summary_line(set: &FeatureSet) -> String {
    let s = &set.summary;
    format!("{} · {} · {} · {} rows", s.sae, s.hook, s.model_name, s.rows)
}

fn index_page(set: &FeatureSet, width: usize, max_density: f64) -> String {
    let s = &set.summary;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>SAE features</h1>\n<p class=\"sub\">SAE <code>{}</code> · hook <code>{}</code> · model <code>{}</code> · \
         {} rows of <code>{}</code> · {} features, {} dead</p>\n",
        html(&s.sae),
        html(&s.hook),
        html(&s.model_name),
        s.rows,
        html(&s.data),
        set.features.len(),
        s.dead.len()
    );
    body.push_str(
        "<p><input id=\"search\" type=\"search\" placeholder=\"feature id or token\" autofocus> \
         <label>density at most <input id=\"max-density\" type=\"number\" min=\"0\" max=\"100\" step=\"any\" placeholder=\"any\">%</label> \
         <span id=\"count\"></span></p>\n\
         <table id=\"features\">\n<thead><tr><th>feature</th><th>fired</th><th data-sort=\"freq\" title=\"sort\">frequency&nbsp;⇅</th>\
         <th data-sort=\"max\" title=\"sort\">max&nbsp;⇅</th><th>top logit tokens</th><th>top example</th>",
    );
    if !set.summary.languages.is_empty() {
        body.push_str("<th>languages of top examples</th>");
    }
    body.push_str("</tr></thead>\n<tbody>\n");
    let _ = writeln!(
        body,
        "<p class=\"sub\">Features firing on more than {} of tokens are marked <span class=\"dense-mark\">dense</span>.</p>",
        percent(max_density)
    );
    for f in &set.features {
        let dense = is_dense(f.frequency, max_density);
        let top = set.top_tokens(f.feature).first().copied();
        let search: Vec<&str> = f.top_logit_tokens.iter().map(String::as_str).chain(top).collect();
        let _ = writeln!(
            body,
            "<tr class=\"feature-row{}{}\" data-id=\"{}\" data-freq=\"{}\" data-max=\"{}\" data-tokens=\"{}\">\
             <td><a href=\"features/{}\">{}</a>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"toks\">{}</td><td class=\"toks\">{}</td>{}</tr>",
            if f.dead { " dead" } else { "" },
            if dense { " dense" } else { "" },
            f.feature,
            f.frequency,
            f.max_activation,
            html(&search.join("\n")),
            page_name(f.feature, width),
            f.feature,
            if f.dead {
                " <span class=\"dead-mark\">dead</span>"
            } else if dense {
                " <span class=\"dense-mark\">dense</span>"
            } else {
                ""
            },
            f.fired,
            percent(f.frequency),
            num(f.max_activation),
            f.top_logit_tokens.iter().take(6).map(|t| tok(t, "", "")).collect::<String>(),
            top.map(|t| tok(t, "", "")).unwrap_or_default(),
            if set.summary.languages.is_empty() {
                String::new()
            } else {
                format!("<td class=\"langs\">{}</td>", html(&set.language_summary(f.feature)))
            },
        );
    }
    body.push_str("</tbody>\n</table>\n<script>\n");
    body.push_str(INDEX_JS);
    body.push_str("</script>\n");
    page(&format!("SAE features · {}", summary_line(set)), "style.css", &body)
}

fn feature_page(set: &FeatureSet, f: &FeatureStats, width: usize) -> String {
    let id = f.feature;
    let mut b = String::new();
    nav_and_title(&mut b, set, f, width);
    stats_section(&mut b, set, f);
    logits_section(&mut b, f);
    neighbors_section(&mut b, set, f, width);
    examples_sections(&mut b, set, f);
    page(&format!("Feature {id} · {}", summary_line(set)), "../style.css", &b)
}

/// The links to the index and the adjacent features, and the title.
fn nav_and_title(b: &mut String, set: &FeatureSet, f: &FeatureStats, width: usize) {
    let id = f.feature;
    let _ = write!(b, "<nav><a href=\"../index.html\">↑ all features</a>");
    if id > 0 {
        let _ = write!(b, " · <a href=\"{}\">← {}</a>", page_name(id - 1, width), id - 1);
    }
    if (id as usize) + 1 < set.features.len() {
        let _ = write!(b, " · <a href=\"{}\">{} →</a>", page_name(id + 1, width), id + 1);
    }
    let _ = write!(
        b,
        "</nav>\n<h1>Feature {id}{}</h1>\n<p class=\"sub\">{}</p>\n<div class=\"cols\">\n",
        if f.dead { " <span class=\"dead-mark\">dead</span>" } else { "" },
        html(&summary_line(set))
    );
}

/// Firing counts, languages and the activation histogram.
fn stats_section(b: &mut String, set: &FeatureSet, f: &FeatureStats) {
    let languages = if set.summary.languages.is_empty() {
        String::new()
    } else {
        format!(
            "<tr><th>languages of top examples</th><td id=\"languages\">{}</td></tr>",
            html(&set.language_summary(f.feature))
        )
    };
    let _ = writeln!(
        b,
        "<section id=\"stats\"><h2>Stats</h2><table>\
         <tr><th>fired</th><td>{} of {} rows</td></tr><tr><th>frequency</th><td>{}</td></tr>\
         <tr><th>max activation</th><td>{}</td></tr><tr><th>mean activation (when firing)</th><td>{}</td></tr>{languages}</table></section>",
        f.fired,
        set.summary.rows,
        percent(f.frequency),
        num(f.max_activation),
        num(f.mean_activation)
    );
    let _ = write!(b, "<section><h2>Activation histogram</h2>\n{}</section>\n", histogram_svg(f));
}

/// The tokens whose logits the feature's decoder row raises and lowers most.
fn logits_section(b: &mut String, f: &FeatureStats) {
    let logits = |title: &str, tokens: &[String], values: &[f32], class: &str| {
        let mut t = format!("<table class=\"logit-table\"><tr><th colspan=\"2\">{title}</th></tr>");
        for (token, v) in tokens.iter().zip(values) {
            let _ = write!(t, "<tr><td>{}</td><td class=\"num\">{v:+.3}</td></tr>", tok(token, class, ""));
        }
        t + "</table>"
    };
    let _ = writeln!(
        b,
        "<section id=\"logits\"><h2>Logit effects</h2><div class=\"cols\">{}{}</div></section>",
        logits("raises", &f.top_logit_tokens, &f.top_logits, "pos"),
        logits("lowers", &f.bottom_logit_tokens, &f.bottom_logits, "neg")
    );
}

/// The features with the nearest decoder rows, linked.
fn neighbors_section(b: &mut String, set: &FeatureSet, f: &FeatureStats, width: usize) {
    b.push_str("<section id=\"neighbors\"><h2>Neighbours</h2><ul>");
    for (&n, cos) in f.neighbors.iter().zip(&f.neighbor_cosines) {
        match set.features.get(n as usize).filter(|g| g.feature == n) {
            Some(g) => {
                let _ = write!(
                    b,
                    "<li><a href=\"{}\">feature {n}</a> <span class=\"cos\">cos {cos:.3}</span> {}{}</li>",
                    page_name(n, width),
                    g.top_logit_tokens.iter().take(3).map(|t| tok(t, "", "")).collect::<String>(),
                    if g.dead { " <span class=\"dead-mark\">dead</span>" } else { "" }
                );
            }
            None => {
                let _ = write!(b, "<li>feature {n} <span class=\"cos\">cos {cos:.3}</span></li>");
            }
        }
    }
    b.push_str("</ul></section>\n</div>\n");
}

/// Top activations, then the quantile samples band by band, highest band first.
fn examples_sections(b: &mut String, set: &FeatureSet, f: &FeatureStats) {
    let examples = set.examples_of(f.feature);
    let max = f.max_activation;
    b.push_str("<section id=\"top-examples\"><h2>Top activations</h2>\n");
    let top: Vec<&Example> = examples.iter().filter(|e| e.kind == ExampleKind::Top).collect();
    if top.is_empty() {
        b.push_str("<p class=\"none\">none</p>\n");
    }
    for e in top {
        b.push_str(&example_row(e, max));
    }
    b.push_str("</section>\n<section id=\"quantiles\"><h2>Quantile samples</h2>\n");
    let mut quantiles: Vec<&Example> = examples.iter().filter(|e| e.kind == ExampleKind::Quantile).collect();
    quantiles.sort_by_key(|e| (std::cmp::Reverse(e.band), e.rank));
    if quantiles.is_empty() {
        b.push_str("<p class=\"none\">none</p>\n");
    }
    for band in quantiles.chunk_by(|a, c| a.band == c.band) {
        let (lo, hi) = band
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), e| (lo.min(e.activation), hi.max(e.activation)));
        let _ = writeln!(
            b,
            "<h3>Band {} of {} <span class=\"sub\">(samples {} to {})</span></h3>",
            band[0].band + 1,
            set.summary.quantile_bands,
            num(lo),
            num(hi)
        );
        for e in band {
            b.push_str(&example_row(e, max));
        }
    }
    b.push_str("</section>\n");
}

/// One example: its activation, then its tokens coloured by activation / `max`, the centre outlined.
fn example_row(e: &Example, max: f32) -> String {
    let mut row = format!(
        "<div class=\"example\"><span class=\"act\" title=\"sequence {}, position {}\">{}</span><span class=\"ctx\">",
        e.sequence_id,
        e.position,
        num(e.activation)
    );
    for (i, token) in e.tokens.iter().enumerate() {
        let a = e.token_activations.get(i).copied().unwrap_or(0.0);
        let alpha = if max > 0.0 && a.is_finite() { (a / max).clamp(0.0, 1.0) } else { 0.0 };
        let attrs = format!(" style=\"background:rgba(255,100,0,{alpha:.3})\" title=\"{}\"", num(a));
        row.push_str(&tok(token, if i == e.center as usize { "center" } else { "" }, &attrs));
    }
    row + "</span></div>\n"
}

/// The histogram of firing activations: bars over (0, max_activation], with axis labels.
fn histogram_svg(f: &FeatureStats) -> String {
    let (w, h, left, top, right, bottom) = (360.0, 170.0, 44.0, 10.0, 12.0, 36.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let base = top + ph;
    let mut s = format!(
        "<svg id=\"histogram\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">\
         <title>Activation histogram of feature {}</title>",
        f.feature
    );
    let peak = f.histogram.iter().copied().max().unwrap_or(0);
    let n = f.histogram.len();
    if peak == 0 || n == 0 || f.max_activation <= 0.0 {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">never fired</text>",
            left + pw / 2.0,
            top + ph / 2.0
        );
    } else {
        let bw = pw / n as f64;
        let step = f.max_activation as f64 / n as f64;
        for (i, &c) in f.histogram.iter().enumerate() {
            let bh = ph * c as f64 / peak as f64;
            let _ = write!(
                s,
                "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\"><title>({:.3}, {:.3}]: {c}</title></rect>",
                left + i as f64 * bw,
                base - bh,
                (bw - 1.0).max(0.5),
                i as f64 * step,
                (i + 1) as f64 * step
            );
        }
        let _ = write!(
            s,
            "<text x=\"{left}\" y=\"{}\" text-anchor=\"start\">0</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{peak}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
            base + 14.0,
            left + pw,
            base + 14.0,
            num(f.max_activation),
            left - 4.0,
            top + 10.0,
            left - 4.0,
            base
        );
    }
    let _ = writeln!(
        s,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\"/><line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{base}\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">activation</text>\
         <text transform=\"translate(12 {}) rotate(-90)\" text-anchor=\"middle\">count</text></svg>",
        left + pw,
        left + pw / 2.0,
        h - 4.0,
        top + ph / 2.0
    );
    s
}

const STYLE: &str = include_str!("browse/style.css");

/// Filters the index rows by the search box, the density limit and the URL; sorts by the
/// marked columns.
const INDEX_JS: &str = include_str!("browse/index.js");

#[cfg(test)]
mod tests {
    use testkit::chromium_dom;

    use super::*;
    use crate::features::set::tests::sample_set;

    #[test]
    fn escapes_hostile_strings() {
        assert_eq!(
            html(r#"<img src=x onerror="a('1')">&amp;"#),
            "&lt;img src=x onerror=&quot;a(&#39;1&#39;)&quot;&gt;&amp;amp;"
        );
        assert_eq!(html("</script><script>x</script>"), "&lt;/script&gt;&lt;script&gt;x&lt;/script&gt;");
        assert_eq!(html(" plain text ü"), " plain text ü");
        assert_eq!(visible(" a\nb\tc\r\0\x7f"), " a↵b⇥c␍␀␡");
        // Tokens are made visible, then escaped; attributes passed to `tok` stay as given.
        assert_eq!(
            tok("<b>\n", "center", " title=\"1.000\""),
            "<span class=\"tok center\" title=\"1.000\">&lt;b&gt;↵</span>"
        );
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(id_width(2), 5);
        assert_eq!(id_width(100_000), 5);
        assert_eq!(id_width(100_001), 6);
        assert_eq!(page_name(42, 5), "00042.html");
        assert_eq!(percent(0.1), "10.000%");
        assert_eq!(percent(0.0), "0");
        assert_eq!(percent(1e-6), "1.00e-4%");
    }

    #[test]
    fn writes_every_page_with_escaped_text() {
        let set = sample_set();
        let dir = tempfile::tempdir().unwrap();
        let index = write_site(&set, &dir.path().join("site"), 0.02).unwrap();
        assert_eq!(index, dir.path().join("site/index.html"));
        for f in ["style.css", "features/00000.html", "features/00001.html"] {
            assert!(dir.path().join("site").join(f).is_file(), "{f} is missing");
        }
        for path in [index, dir.path().join("site/features/00000.html")] {
            let text = std::fs::read_to_string(&path).unwrap();
            // The only raw `<script` is the index's own inline script; untrusted `<` never survives.
            assert!(text.matches("<script").count() <= 1, "{}", path.display());
            assert!(!text.contains("<img"), "{}", path.display());
        }
    }

    /// The opening tag of the index row of `feature`.
    fn row_tag(dom: &str, feature: u32) -> &str {
        let at = dom.find(&format!("data-id=\"{feature}\"")).unwrap_or_else(|| panic!("no row for feature {feature}"));
        let start = dom[..at].rfind("<tr").unwrap();
        &dom[start..start + dom[start..].find('>').unwrap()]
    }

    /// No injected handler or script ran (they would set `data-pwned` on the body), and no
    /// injected element exists: the page's own scripts are all the `<script` there is (Chromium
    /// writes `<` in attribute values as `&lt;`).
    fn assert_not_pwned(dom: &str, own_scripts: usize) {
        assert!(!dom.contains("data-pwned=\""), "an injected script ran: {dom}");
        assert!(!dom.contains("<img"), "an injected element was parsed: {dom}");
        assert_eq!(dom.matches("<script").count(), own_scripts, "an injected element was parsed: {dom}");
    }

    #[test]
    fn chromium_renders_the_site_without_running_injected_code() {
        let set = sample_set();
        let dir = tempfile::tempdir().unwrap();
        let index = write_site(&set, dir.path(), 0.02).unwrap();
        let url = format!("file://{}", index.canonicalize().unwrap().display());

        let dom = chromium_dom(&url);
        assert_not_pwned(&dom, 1);
        assert!(dom.contains("id=\"search\""));
        assert!(dom.contains("id=\"features\""));
        assert_eq!(dom.matches("class=\"feature-row").count(), 2);
        assert!(dom.contains("href=\"features/00000.html\""));
        assert!(row_tag(&dom, 1).contains("feature-row dead"));
        assert!(dom.contains("class=\"dead-mark\">dead<"));
        assert!(dom.contains("2 of 2 features"), "the script did not run");
        assert!(!row_tag(&dom, 0).contains("hidden") && !row_tag(&dom, 1).contains("hidden"));
        // The hostile top logit token shows as text.
        assert!(
            dom.contains("&lt;/script&gt;&lt;script&gt;document.body.setAttribute('data-pwned','3')&lt;/script&gt;")
        );

        // Search by token (case-insensitive), then by id, prefilled from the URL.
        let dom = chromium_dom(&format!("{url}#q=PWNED"));
        assert_not_pwned(&dom, 1);
        assert!(!row_tag(&dom, 0).contains("hidden"));
        assert!(row_tag(&dom, 1).contains("hidden"));
        assert!(dom.contains("1 of 2 features"));
        let dom = chromium_dom(&format!("{url}#q=1"));
        assert!(row_tag(&dom, 0).contains("hidden"));
        assert!(!row_tag(&dom, 1).contains("hidden"));

        // Feature 0's page.
        let page = dir.path().join("features/00000.html").canonicalize().unwrap();
        let dom = chromium_dom(&format!("file://{}", page.display()));
        assert_not_pwned(&dom, 0);
        for id in ["histogram", "top-examples", "quantiles", "logits", "neighbors", "stats"] {
            assert!(dom.contains(&format!("id=\"{id}\"")), "no #{id}");
        }
        assert!(dom.contains("<svg id=\"histogram\""));
        assert_eq!(dom.matches("<rect class=\"bar\"").count(), 4);
        assert!(dom.contains("href=\"../index.html\""));
        assert!(dom.contains("<a href=\"00001.html\">feature 1</a>"));
        assert!(dom.contains("cos 0.125"));
        // 3 examples of 3 tokens; the centre outlined, its activation on hover.
        assert_eq!(dom.matches("class=\"tok\"").count() + dom.matches("class=\"tok center\"").count(), 9);
        assert_eq!(dom.matches("class=\"tok center\"").count(), 3);
        assert!(dom.contains("title=\"3.500\""));
        assert!(dom.contains("rgba(255, 100, 0, 1)") || dom.contains("rgba(255,100,0,1.000)"));
        assert!(dom.contains("&lt;img src=x onerror=\"document.body.setAttribute('data-pwned','1')\"&gt;"));
        assert!(dom.contains("&lt;script&gt;document.body.setAttribute('data-pwned','2')&lt;/script&gt;"));
        assert!(dom.contains(" ok &amp; done"));
        assert!(dom.contains("Band 1 of 2"));
        assert!(dom.contains("<td id=\"languages\">en 50% · de 50%</td>"), "no languages on the page");
    }

    /// The ids of the index rows in document order, and of those hidden.
    fn row_order(dom: &str) -> (Vec<u32>, Vec<u32>) {
        let (mut order, mut hidden) = (Vec::new(), Vec::new());
        for part in dom.split("<tr class=\"feature-row").skip(1) {
            let tag = &part[..part.find('>').unwrap()];
            let id = tag.split("data-id=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
            order.push(id);
            if tag.contains("hidden") {
                hidden.push(id);
            }
        }
        (order, hidden)
    }

    #[test]
    fn chromium_sorts_and_filters_the_index_by_density() {
        let mut set = sample_set();
        // Densities 10% (dense), 0 (dead), 2% (exactly at the 2% limit: not dense), 0.5%.
        for (id, frequency) in [(2u32, 0.02), (3, 0.005)] {
            let mut f = set.features[0].clone();
            (f.feature, f.frequency) = (id, frequency);
            set.features.push(f);
        }
        set.summary.d_sae = 4;
        let dir = tempfile::tempdir().unwrap();
        let index = write_site(&set, dir.path(), 0.02).unwrap();
        let url = format!("file://{}", index.canonicalize().unwrap().display());

        let dom = chromium_dom(&url);
        assert!(row_tag(&dom, 0).contains("feature-row dense"), "{}", row_tag(&dom, 0));
        assert!(!row_tag(&dom, 2).contains("dense"), "a feature at the limit is not dense");
        assert_eq!(row_order(&dom), (vec![0, 1, 2, 3], vec![]));

        let dom = chromium_dom(&format!("{url}#sort=freq&dir=asc"));
        assert_eq!(row_order(&dom).0, vec![1, 3, 2, 0]);
        let dom = chromium_dom(&format!("{url}#sort=freq"));
        assert_eq!(row_order(&dom).0, vec![0, 2, 3, 1]);

        // At most 2%: the 10% feature goes, the one at exactly 2% stays.
        let dom = chromium_dom(&format!("{url}#max-density=2&sort=freq&dir=asc"));
        assert_eq!(row_order(&dom), (vec![1, 3, 2, 0], vec![0]));
        assert!(dom.contains("3 of 4 features"));
        let dom = chromium_dom(&format!("{url}#max-density=1"));
        assert_eq!(row_order(&dom).1, vec![0, 2]);
        // Combined with a token query.
        let dom = chromium_dom(&format!("{url}#q=pwned&max-density=1"));
        assert_eq!(row_order(&dom).1, vec![0, 1, 2]);
        assert!(dom.contains("1 of 4 features"));
    }
}
