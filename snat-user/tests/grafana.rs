//! The Grafana dashboard in `deploy/grafana/snat.json` stays importable and in step with the
//! metrics the agent serves: every query names a family that `snat_user::serve::metrics::families`
//! produces, with labels those families carry, filtered by the dashboard's variables, and the
//! panels do not overlap. Plain JSON and string checks: no Grafana or Prometheus needed.

use std::collections::{BTreeMap, BTreeSet};

use prometheus::proto::MetricType;
use serde_json::Value;
use snat_common::Proto;
use snat_user::{
    serve::metrics::families,
    serve::report::{DestinationUse, Pool, Report, SourceUse},
};

/// Labels a dashboard query may select or group on: the agent's own, `instance` (added by the
/// scrape) and `le` (histogram buckets).
const ALLOWED_LABELS: &[&str] = &[
    "instance",
    "nat_ip",
    "proto",
    "direction",
    "result",
    "reason",
    "method",
    "source",
    "destination",
    "le",
];

/// Labels with a dashboard variable of the same name: a query on a family carrying one must
/// filter on it (`label=~"$label"`), so the dashboard's selectors apply to every panel.
const FILTER_LABELS: &[&str] = &["nat_ip", "proto"];

/// Variables Grafana defines itself.
const BUILTIN_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__range",
    "__interval_ms",
    "__range_s",
];

const GRID_COLUMNS: i64 = 24;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/snat.json");

fn dashboard() -> Value {
    let text = std::fs::read_to_string(PATH)
        .unwrap_or_else(|e| panic!("cannot read the Grafana dashboard {PATH}: {e}"));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{PATH} is not valid JSON (Grafana could not import it): {e}"))
}

/// Every panel, including those nested in collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    let top = d["panels"]
        .as_array()
        .unwrap_or_else(|| panic!("{PATH}: `panels` must be an array"));
    let mut out = Vec::new();
    for p in top {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

fn is_row(p: &Value) -> bool {
    p["type"] == "row"
}

fn title(p: &Value) -> &str {
    p["title"].as_str().unwrap_or("<untitled>")
}

/// (panel title, query) for every target of every panel.
fn exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| {
                panic!(
                    "panel {:?}: target {} has no `expr` string",
                    title(p),
                    t["refId"]
                )
            });
            out.push((title(p).to_owned(), expr.to_owned()));
        }
    }
    out
}

/// One label matcher of a selector, e.g. `nat_ip=~"$nat_ip"`.
#[derive(Debug)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// A `snat_…` metric as written in a query, with its `{…}` matchers (if any).
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

/// What a query uses: its `snat_…` selectors and the labels of its `by (…)`/`without (…)`
/// clauses.
#[derive(Debug, Default)]
struct Query {
    selectors: Vec<Selector>,
    grouping: Vec<String>,
    variables: Vec<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$'
}

/// The index just past the string literal opening at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The text between `chars[open]` and its closing `close`, outside string literals, and the
/// index past the closer.
fn enclosed(chars: &[char], open: usize, close: char, expr: &str) -> (String, usize) {
    let mut i = open + 1;
    while i < chars.len() && chars[i] != close {
        if matches!(chars[i], '"' | '\'' | '`') {
            i = skip_string(chars, i);
        } else {
            i += 1;
        }
    }
    assert!(
        i < chars.len(),
        "unclosed {:?} in query {expr:?}",
        chars[open]
    );
    (chars[open + 1..i].iter().collect(), i + 1)
}

/// Splits on commas outside string literals.
fn split_top_level(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            ',' => {
                out.push(chars[start..i].iter().collect::<String>());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(chars[start.min(chars.len())..].iter().collect());
    out.into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_matcher(m: &str, expr: &str) -> Matcher {
    let at = m
        .find(['=', '!'])
        .unwrap_or_else(|| panic!("matcher {m:?} in query {expr:?} has no operator"));
    let op_len =
        if m[at..].starts_with("=~") || m[at..].starts_with("!~") || m[at..].starts_with("!=") {
            2
        } else {
            1
        };
    let value = m[at + op_len..].trim();
    Matcher {
        label: m[..at].trim().to_owned(),
        op: m[at..at + op_len].to_owned(),
        value: value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value)
            .to_owned(),
    }
}

/// A small PromQL scanner: enough for the dashboard's queries (selectors, grouping clauses,
/// variables), not a parser of the whole language.
fn parse(expr: &str) -> Query {
    let chars: Vec<char> = expr.chars().collect();
    let mut q = Query::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            // Variables inside strings (`=~"$nat_ip"`) are still variables.
            let end = skip_string(&chars, i);
            let literal: String = chars[i..end.min(chars.len())].iter().collect();
            q.variables.extend(variables_in(&literal));
            i = end;
            continue;
        }
        if !is_ident(c) || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if let Some(var) = word.strip_prefix('$') {
            q.variables.push(var.to_owned());
        } else if word == "by" || word == "without" {
            let open = skip_space(&chars, i);
            assert!(
                chars.get(open) == Some(&'('),
                "`{word}` not followed by a label list in query {expr:?}"
            );
            let (labels, end) = enclosed(&chars, open, ')', expr);
            q.grouping.extend(split_top_level(&labels));
            i = end;
        } else if word.starts_with("snat_") {
            let open = skip_space(&chars, i);
            let mut matchers = Vec::new();
            if chars.get(open) == Some(&'{') {
                let (body, end) = enclosed(&chars, open, '}', expr);
                matchers = split_top_level(&body)
                    .iter()
                    .map(|m| parse_matcher(m, expr))
                    .collect();
                i = end;
            }
            for m in &matchers {
                q.variables.extend(variables_in(&m.value));
            }
            q.selectors.push(Selector {
                metric: word,
                matchers,
            });
        }
    }
    q
}

/// `$name` and `${name}` references in a piece of text.
fn variables_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, part) in text.split('$').enumerate() {
        if n == 0 {
            continue;
        }
        let part = part.strip_prefix('{').unwrap_or(part);
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// A report with a sample of every kind, so that each family has samples and thus labels.
fn sample_report() -> Report {
    let one = |k: &str| BTreeMap::from([(k.to_owned(), 1)]);
    Report {
        pools: vec![Pool {
            nat_ip: "198.51.100.1".into(),
            proto: Proto::Tcp,
            ports_total: 100,
            ports_in_use: 1,
            used_percent: 1.0,
            mappings: 1,
            exhausted_flows: 0,
            overflowed_flows: 0,
        }],
        mappings: BTreeMap::from([(Proto::Tcp, 1)]),
        port_claims: BTreeMap::from([(Proto::Tcp, 1)]),
        top_sources: vec![SourceUse {
            source: "10.1.0.2".into(),
            ports: 1,
        }],
        top_destinations: vec![DestinationUse {
            nat_ip: "198.51.100.1".into(),
            proto: Proto::Tcp,
            destination: "203.0.113.10:443".into(),
            ports: 1,
            saturation: 0.01,
        }],
        counters: BTreeMap::from([
            ("egress".to_owned(), one("drop_table_full")),
            ("ingress".to_owned(), one("translated_tcp")),
            ("alloc".to_owned(), one("created_tcp")),
        ]),
        expired: BTreeMap::from([(Proto::Tcp, one("idle"))]),
        ..Report::default()
    }
}

/// Family name → (type, label names), from the families the agent serves.
fn served() -> BTreeMap<String, (MetricType, BTreeSet<String>)> {
    let names: BTreeSet<String> = families(&Report::default())
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    let mut out = BTreeMap::new();
    for f in families(&sample_report()) {
        let labels = f
            .get_metric()
            .iter()
            .flat_map(|m| m.get_label().iter().map(|l| l.name().to_owned()))
            .collect();
        out.insert(f.name().to_owned(), (f.get_field_type(), labels));
    }
    assert_eq!(
        out.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "families() should produce the same families for an empty and a busy report"
    );
    out
}

/// The family a metric name in a query belongs to: itself, or the histogram whose
/// `_bucket`/`_sum`/`_count` series it is. `None` if the agent serves no such family.
fn family_of<'a>(
    metric: &str,
    served: &'a BTreeMap<String, (MetricType, BTreeSet<String>)>,
) -> Option<(&'a str, &'a (MetricType, BTreeSet<String>))> {
    if let Some((name, f)) = served.get_key_value(metric) {
        return Some((name, f));
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = metric.strip_suffix(suffix)?;
        served
            .get_key_value(base)
            .filter(|(_, (kind, _))| *kind == MetricType::HISTOGRAM)
            .map(|(name, f)| (name.as_str(), f))
    })
}

#[test]
fn dashboard_is_identified_and_importable() {
    let d = dashboard();
    assert_eq!(
        d["title"], "snat — SNAT activity",
        "dashboard title (the README names it)"
    );
    assert_eq!(
        d["uid"], "snat-activity",
        "dashboard uid (links and provisioning rely on it)"
    );
    assert!(
        d["schemaVersion"].as_i64().is_some_and(|v| v >= 36),
        "schemaVersion should be a modern one (≥ 36), got {}",
        d["schemaVersion"]
    );
    let inputs = d["__inputs"].as_array().cloned().unwrap_or_default();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "__inputs should declare the DS_PROMETHEUS Prometheus datasource so the import asks for it; got {inputs:?}"
    );

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let id = p["id"].as_i64();
        assert!(
            id.is_some_and(|id| ids.insert(id)),
            "panel {:?} needs a unique numeric id, got {}",
            title(p),
            p["id"]
        );
        if is_row(p) {
            continue;
        }
        assert!(
            p["title"].as_str().is_some_and(|t| !t.trim().is_empty()),
            "every panel needs a title: {p}"
        );
        assert!(
            p["description"]
                .as_str()
                .is_some_and(|t| t.trim().len() > 20),
            "panel {:?} needs a description telling the operator what it shows",
            title(p)
        );
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {:?} has no query", title(p));
        for ds in std::iter::once(&p["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
        {
            assert_eq!(
                ds["uid"],
                "${DS_PROMETHEUS}",
                "panel {:?} should use the imported datasource ${{DS_PROMETHEUS}}, got {ds}",
                title(p)
            );
        }
    }
}

#[test]
fn panels_do_not_overlap() {
    let d = dashboard();
    let mut rects: Vec<(String, [i64; 4])> = Vec::new();
    for p in panels(&d) {
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_i64().unwrap_or_else(|| {
                panic!(
                    "panel {:?}: gridPos.{k} must be an integer, gridPos is {g}",
                    title(p)
                )
            })
        });
        assert!(
            x >= 0 && y >= 0 && w > 0 && h > 0 && x + w <= GRID_COLUMNS,
            "panel {:?}: gridPos {g} must lie within the {GRID_COLUMNS}-column grid with a positive size",
            title(p)
        );
        for (other, [ox, oy, ow, oh]) in &rects {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(
                !overlap,
                "panel {:?} at {g} overlaps panel {other:?} at x={ox} y={oy} w={ow} h={oh}",
                title(p)
            );
        }
        rects.push((title(p).to_owned(), [x, y, w, h]));
    }
    assert!(rects.len() > 1, "the dashboard should have panels");
}

#[test]
fn queries_use_served_metrics_and_labels() {
    let d = dashboard();
    let served = served();
    let exprs = exprs(&d);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut used = BTreeSet::new();
    for (panel, expr) in &exprs {
        let q = parse(expr);
        assert!(
            !q.selectors.is_empty(),
            "panel {panel:?}: query {expr:?} uses no snat_ metric"
        );
        let mut carried: BTreeSet<&str> = BTreeSet::from(["instance"]);
        for s in &q.selectors {
            assert!(
                s.metric["snat_".len()..]
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_'),
                "panel {panel:?}: metric {:?} in {expr:?} is not a snat_[a-z_]+ name",
                s.metric
            );
            let (family, (kind, labels)) = family_of(&s.metric, &served).unwrap_or_else(|| {
                panic!(
                    "panel {panel:?}: metric {:?} in {expr:?} is not served by the agent; families are {:?}",
                    s.metric,
                    served.keys().collect::<Vec<_>>()
                )
            });
            used.insert(family);
            carried.extend(labels.iter().map(String::as_str));
            let bucket = *kind == MetricType::HISTOGRAM && s.metric.ends_with("_bucket");
            if bucket {
                carried.insert("le");
            }
            for m in &s.matchers {
                assert!(
                    ALLOWED_LABELS.contains(&m.label.as_str()),
                    "panel {panel:?}: label {:?} selected on {} in {expr:?} is not one of {ALLOWED_LABELS:?}",
                    m.label,
                    s.metric
                );
                assert!(
                    m.label == "instance"
                        || labels.contains(&m.label)
                        || (bucket && m.label == "le"),
                    "panel {panel:?}: {family} has no label {:?} (it has {labels:?}), in {expr:?}",
                    m.label
                );
            }
            let filters = |label: &str| {
                s.matchers
                    .iter()
                    .any(|m| m.label == label && m.op == "=~" && m.value == format!("${label}"))
            };
            assert!(
                filters("instance"),
                "panel {panel:?}: {} in {expr:?} should be filtered with instance=~\"$instance\"",
                s.metric
            );
            for label in FILTER_LABELS {
                assert!(
                    !labels.contains(*label) || filters(label),
                    "panel {panel:?}: {} carries {label:?}, so {expr:?} should filter it with {label}=~\"${label}\"",
                    s.metric
                );
            }
        }
        for label in &q.grouping {
            assert!(
                ALLOWED_LABELS.contains(&label.as_str()),
                "panel {panel:?}: grouping label {label:?} in {expr:?} is not one of {ALLOWED_LABELS:?}"
            );
            assert!(
                carried.contains(label.as_str()),
                "panel {panel:?}: grouping on {label:?} in {expr:?}, but none of its metrics carries it ({carried:?})"
            );
        }
    }
    for family in [
        "snat_ports_in_use",
        "snat_ports_total",
        "snat_port_exhaustion_total",
    ] {
        assert!(
            used.contains(family),
            "the dashboard should chart {family}, the core of SNAT exhaustion"
        );
    }
}

#[test]
fn query_variables_are_defined() {
    let d = dashboard();
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    for name in ["instance", "nat_ip", "proto"] {
        assert!(
            vars.contains_key(name),
            "templating should define the {name:?} variable; it defines {:?}",
            vars.keys().collect::<Vec<_>>()
        );
    }
    for name in ["nat_ip", "proto"] {
        assert!(
            vars[name]["multi"] == true && vars[name]["includeAll"] == true,
            "variable {name:?} should allow several values and All"
        );
    }
    assert_eq!(
        vars["proto"]["query"], "tcp,udp,icmp",
        "the proto variable lists the protocols snat translates"
    );
    for (panel, expr) in exprs(&d) {
        for var in parse(&expr).variables {
            assert!(
                vars.contains_key(var.as_str()) || BUILTIN_VARIABLES.contains(&var.as_str()),
                "panel {panel:?}: query {expr:?} uses ${var}, which the dashboard does not define"
            );
        }
    }
}

#[test]
fn scanner_reads_selectors_grouping_and_variables() {
    let q = parse(
        r#"histogram_quantile(0.99, sum by (le) (rate(snat_allocation_duration_seconds_bucket{instance=~"$instance", result!~"a,b}"}[$__rate_interval])))"#,
    );
    assert_eq!(q.grouping, ["le"]);
    assert_eq!(q.selectors.len(), 1);
    let s = &q.selectors[0];
    assert_eq!(s.metric, "snat_allocation_duration_seconds_bucket");
    let m: Vec<_> = s
        .matchers
        .iter()
        .map(|m| (m.label.as_str(), m.op.as_str(), m.value.as_str()))
        .collect();
    assert_eq!(
        m,
        [("instance", "=~", "$instance"), ("result", "!~", "a,b}")]
    );
    assert_eq!(q.variables, ["instance", "__rate_interval"]);
}
