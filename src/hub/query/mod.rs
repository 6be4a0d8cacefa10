//! The IoT Hub query language: `SELECT ... FROM devices | devices.modules | devices.jobs
//! [WHERE ...] [GROUP BY ...]`, parsed into a checked syntax tree and evaluated over twin or
//! job documents that the caller already holds in memory (REST JSON shape). Pure code: no I/O,
//! no store access and no paging; the REST layer feeds documents in and pages the rows out.
//!
//! Choices worth knowing (IoT Hub follows Cosmos DB here):
//! - A missing path is *undefined*; comparing undefined, or values of different types, never
//!   matches — not even with `!=`, and `NOT (x = 1)` does not match a document without `x`.
//! - Keywords, function and source names are case-insensitive; property names are not.
//! - Without `AS`, a column is named after the last segment of its path, else `$1`, `$2`, ...
//!   A column whose value is undefined is left out of its row.
//! - Positions in errors are 1-based character offsets into the query text.

mod eval;
mod lexer;
mod parser;

use serde_json::Value;

/// The longest query text accepted, in characters (as IoT Hub).
pub const MAX_QUERY_LENGTH: usize = 8192;

/// What went wrong while parsing, and where (1-based character position) when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", .position.map(|p| format!(" at position {p}")).unwrap_or_default())]
pub struct QueryError {
    message: String,
    position: Option<usize>,
}

impl QueryError {
    fn new(message: impl Into<String>) -> Self {
        QueryError {
            message: message.into(),
            position: None,
        }
    }

    fn at(message: impl Into<String>, position: usize) -> Self {
        QueryError {
            message: message.into(),
            position: Some(position),
        }
    }

    /// The problem, without the position.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The 1-based character position the problem was found at, if it has one.
    pub fn position(&self) -> Option<usize> {
        self.position
    }
}

/// The collection a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `FROM devices`: device twins.
    Devices,
    /// `FROM devices.modules`: module twins.
    DevicesModules,
    /// `FROM devices.jobs`: per-device job rows.
    DevicesJobs,
}

impl Source {
    /// The collection name as written in a query.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Devices => "devices",
            Source::DevicesModules => "devices.modules",
            Source::DevicesJobs => "devices.jobs",
        }
    }
}

/// The `x-ms-item-type` of a query response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemType {
    Twin,
    DeviceJob,
    JobResponse,
    Raw,
}

impl ItemType {
    /// The header value: `Twin`, `DeviceJob`, `JobResponse` or `Raw`.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemType::Twin => "Twin",
            ItemType::DeviceJob => "DeviceJob",
            ItemType::JobResponse => "JobResponse",
            ItemType::Raw => "Raw",
        }
    }
}

/// Every row a query produced, in document order (groups in order of first appearance).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    pub item_type: ItemType,
    pub items: Vec<Value>,
}

/// A parsed and checked query, ready to run any number of times.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    ast: parser::Ast,
}

/// Parses a full `SELECT` query.
pub fn parse(query: &str) -> Result<Query, QueryError> {
    check_length(query)?;
    Ok(Query {
        ast: parser::parse_query(query)?,
    })
}

impl Query {
    /// The collection the query reads.
    pub fn source(&self) -> Source {
        self.ast.source
    }

    /// The `TOP n` limit, if any.
    pub fn top(&self) -> Option<usize> {
        self.ast.top
    }

    /// The item type of this query's rows: `Twin` (or `DeviceJob` for `devices.jobs`) for
    /// `SELECT *`, `Raw` for projections and aggregates.
    pub fn item_type(&self) -> ItemType {
        match (&self.ast.select, self.ast.source) {
            (parser::Select::All, Source::DevicesJobs) => ItemType::DeviceJob,
            (parser::Select::All, _) => ItemType::Twin,
            _ => ItemType::Raw,
        }
    }

    /// Evaluate over documents (already in the REST twin JSON shape); returns all result rows
    /// (paging is the caller's job). `TOP n` is applied after filtering and grouping.
    /// Evaluation itself cannot fail today; the `Result` leaves room for run-time limits.
    pub fn execute<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a Value>,
    ) -> Result<QueryResult, QueryError> {
        let matching = docs.into_iter().filter(|doc| self.matches(doc));
        let items = eval::rows(
            &self.ast.select,
            matching,
            self.ast.top.unwrap_or(usize::MAX),
        );
        Ok(QueryResult {
            item_type: self.item_type(),
            items,
        })
    }

    /// Whether one document satisfies the WHERE clause (true when there is none).
    pub fn matches(&self, doc: &Value) -> bool {
        self.ast
            .condition
            .as_ref()
            .is_none_or(|condition| eval::matches(condition, doc))
    }
}

/// A bare condition, as in a job's `queryCondition` (`deviceId IN ['a','b']`).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: parser::Expr,
}

/// Parses a bare condition such as `deviceId IN ['a','b']`. An empty condition is an error.
pub fn parse_condition(cond: &str) -> Result<Condition, QueryError> {
    check_length(cond)?;
    Ok(Condition {
        expr: parser::parse_condition(cond)?,
    })
}

impl Condition {
    /// Whether `doc` satisfies the condition (it evaluates to exactly `true`).
    pub fn matches(&self, doc: &Value) -> bool {
        eval::matches(&self.expr, doc)
    }
}

fn check_length(text: &str) -> Result<(), QueryError> {
    let length = text.chars().count();
    if length > MAX_QUERY_LENGTH {
        return Err(QueryError::new(format!(
            "the query is {length} characters long; the limit is {MAX_QUERY_LENGTH}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn twins() -> Vec<Value> {
        vec![
            json!({
                "deviceId": "door-01", "etag": "AAAA", "version": 3, "status": "enabled",
                "connectionState": "Connected", "lastActivityTime": "2026-01-02T03:04:05Z",
                "tags": {"location": {"plant": "Redmond43"}},
                "properties": {
                    "desired": {"a": 1, "$metadata": {"$lastUpdated": "2026-01-01T00:00:00Z"}, "$version": 2},
                    "reported": {"connectivity": {"type": "cellular"}, "temp": 20, "$version": 4}
                }
            }),
            json!({
                "deviceId": "door-02", "version": 5, "status": "enabled",
                "connectionState": "Disconnected",
                "tags": {"location": {"plant": "Redmond43"}},
                "properties": {
                    "desired": {"$version": 1},
                    "reported": {"connectivity": {"type": "wifi"}, "temp": 25.5, "$version": 7}
                }
            }),
            json!({
                "deviceId": "door-03", "version": 1, "status": "disabled",
                "connectionState": "Disconnected",
                "tags": {"location": {"plant": "Dublin"}},
                "properties": {
                    "desired": {"$version": 1},
                    "reported": {"connectivity": {"type": "cellular"}, "temp": 30, "$version": 2}
                }
            }),
            json!({
                "deviceId": "door-04", "version": 1, "status": "enabled",
                "connectionState": "Connected",
                "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}
            }),
        ]
    }

    fn run(query: &str) -> QueryResult {
        let docs = twins();
        parse(query)
            .expect("query parses")
            .execute(&docs)
            .expect("query runs")
    }

    fn ids(result: &QueryResult) -> Vec<&str> {
        result
            .items
            .iter()
            .map(|row| row["deviceId"].as_str().unwrap_or("?"))
            .collect()
    }

    #[test]
    fn doc_example_select_star_with_and() {
        let result = run(
            "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' \
             AND properties.reported.connectivity.type = 'cellular'",
        );
        assert_eq!(result.item_type, ItemType::Twin);
        assert_eq!(ids(&result), ["door-01"]);
        assert_eq!(
            result.items[0],
            twins()[0],
            "SELECT * returns the document as is"
        );
    }

    #[test]
    fn doc_example_count() {
        let result = run("SELECT COUNT() AS n FROM devices");
        assert_eq!(result.item_type, ItemType::Raw);
        assert_eq!(result.items, vec![json!({"n": 4})]);
        let none = run("SELECT COUNT() AS n FROM devices WHERE deviceId = 'nope'");
        assert_eq!(none.items, vec![json!({"n": 0})]);
    }

    #[test]
    fn doc_example_group_by() {
        let result = run(
            "SELECT properties.reported.connectivity.type AS t, COUNT() AS n FROM devices \
             GROUP BY properties.reported.connectivity.type",
        );
        assert_eq!(result.item_type, ItemType::Raw);
        assert_eq!(
            result.items,
            vec![
                json!({"t": "cellular", "n": 2}),
                json!({"t": "wifi", "n": 1}),
                json!({"n": 1})
            ]
        );
    }

    #[test]
    fn doc_example_job_condition() {
        let cond = parse_condition("deviceId IN ['door-01','door-02']").expect("parses");
        let matched: Vec<bool> = twins().iter().map(|d| cond.matches(d)).collect();
        assert_eq!(matched, [true, true, false, false]);
    }

    #[test]
    fn group_by_without_projection_and_aggregates() {
        let result = run(
            "SELECT COUNT() AS n, AVG(properties.reported.temp) AS avg, \
             SUM(properties.reported.temp) AS sum, MIN(properties.reported.temp) AS lo, \
             MAX(properties.reported.temp) AS hi FROM devices GROUP BY status",
        );
        assert_eq!(
            result.items,
            vec![
                json!({"n": 3, "avg": 22.75, "sum": 45.5, "lo": 20, "hi": 25.5, "status": "enabled"}),
                json!({"n": 1, "avg": 30, "sum": 30, "lo": 30, "hi": 30, "status": "disabled"}),
            ]
        );
        let result = run("SELECT MIN(deviceId) AS first, MAX(deviceId) AS last FROM devices");
        assert_eq!(
            result.items,
            vec![json!({"first": "door-01", "last": "door-04"})]
        );
        let result = run("SELECT AVG(tags.nothing) AS a, SUM(tags.nothing) AS s FROM devices");
        assert_eq!(
            result.items,
            vec![json!({"s": 0})],
            "AVG of nothing is undefined"
        );
    }

    #[test]
    fn group_by_two_paths() {
        let result = run("SELECT status, connectionState, COUNT() AS n FROM devices GROUP BY status, connectionState");
        assert_eq!(
            result.items,
            vec![
                json!({"status": "enabled", "connectionState": "Connected", "n": 2}),
                json!({"status": "enabled", "connectionState": "Disconnected", "n": 1}),
                json!({"status": "disabled", "connectionState": "Disconnected", "n": 1}),
            ]
        );
    }

    #[test]
    fn projections_omit_missing_values() {
        let result =
            run("SELECT deviceId, tags.location.plant AS plant FROM devices WHERE version < 5");
        assert_eq!(result.item_type, ItemType::Raw);
        assert_eq!(
            result.items,
            vec![
                json!({"deviceId": "door-01", "plant": "Redmond43"}),
                json!({"deviceId": "door-03", "plant": "Dublin"}),
                json!({"deviceId": "door-04"}),
            ]
        );
        let result =
            run("SELECT deviceId, version * 10 AS v10 FROM devices WHERE deviceId = 'door-02'");
        assert_eq!(
            result.items,
            vec![json!({"deviceId": "door-02", "v10": 50})]
        );
    }

    #[test]
    fn top_applies_after_filtering() {
        let result = run("SELECT TOP 2 * FROM devices WHERE status = 'enabled'");
        assert_eq!(ids(&result), ["door-01", "door-02"]);
        assert!(run("SELECT TOP 0 * FROM devices").items.is_empty());
        let grouped = run("SELECT TOP 1 status, COUNT() AS n FROM devices GROUP BY status");
        assert_eq!(grouped.items, vec![json!({"status": "enabled", "n": 3})]);
    }

    #[test]
    fn job_rows() {
        let rows = vec![
            json!({"deviceId": "door-01", "jobId": "j1", "jobType": "scheduleDeviceMethod", "status": "completed"}),
            json!({"deviceId": "door-02", "jobId": "j1", "jobType": "scheduleDeviceMethod", "status": "failed"}),
            json!({"deviceId": "door-01", "jobId": "j2", "jobType": "scheduleUpdateTwin", "status": "completed"}),
        ];
        let query = parse("SELECT * FROM devices.jobs WHERE jobId = 'j1' AND status = 'completed'")
            .expect("parses");
        assert_eq!(query.source(), Source::DevicesJobs);
        let result = query.execute(&rows).expect("runs");
        assert_eq!(result.item_type, ItemType::DeviceJob);
        assert_eq!(result.items, vec![rows[0].clone()]);
        // The documented long form names the same fields.
        let long = parse(
            "SELECT devices.jobs.deviceId AS d FROM devices.jobs WHERE devices.jobs.jobId = 'j1' AND devices.jobs.status = 'completed'",
        )
        .expect("parses");
        assert_eq!(
            long.execute(&rows).expect("runs").items,
            vec![json!({"d": "door-01"})]
        );
    }

    #[test]
    fn sources_and_item_types() {
        assert_eq!(
            parse("SELECT * FROM devices.modules").map(|q| q.source()),
            Ok(Source::DevicesModules)
        );
        assert_eq!(ItemType::JobResponse.as_str(), "JobResponse");
        assert_eq!(Source::DevicesJobs.as_str(), "devices.jobs");
        let q = parse("SELECT * FROM devices").expect("parses");
        assert!(q.matches(&json!({})), "no WHERE matches everything");
        assert_eq!(q.top(), None);
    }

    #[test]
    fn length_limit() {
        let padding = " ".repeat(MAX_QUERY_LENGTH);
        let err = parse(&format!("SELECT * FROM devices{padding}")).expect_err("too long");
        assert!(err.to_string().contains("limit is 8192"), "{err}");
        assert!(parse_condition(&format!("a = 1{padding}")).is_err());
        let just_fits = format!("SELECT * FROM devices{}", " ".repeat(MAX_QUERY_LENGTH - 21));
        assert!(parse(&just_fits).is_ok());
    }

    #[test]
    fn error_display_names_position() {
        let err = parse("SELECT * FROM devices WHERE deviceId =").expect_err("incomplete");
        assert_eq!(
            err.to_string(),
            "expected a value after '=' but found end of query at position 39"
        );
        assert_eq!(err.position(), Some(39));
        assert_eq!(
            err.message(),
            "expected a value after '=' but found end of query"
        );
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_stack_overflow() {
        for text in [
            format!(
                "SELECT * FROM devices WHERE {}a = 1{}",
                "(".repeat(4000),
                ")".repeat(4000)
            ),
            format!("SELECT * FROM devices WHERE {}a", "NOT ".repeat(2000)),
            format!("SELECT * FROM devices WHERE a = {}1", "-".repeat(8000)),
            format!("SELECT * FROM devices WHERE a IN ({}1", "(".repeat(8000)),
        ] {
            let err = parse(&text).expect_err("too deep");
            assert!(err.to_string().contains("nested too deeply"), "{err}");
        }
    }

    // ----- property tests -----

    fn arb_path() -> impl Strategy<Value = String> {
        let first = prop::sample::select(vec![
            "deviceId",
            "status",
            "connectionState",
            "lastActivityTime",
            "version",
            "tags.location.plant",
            "properties.reported.connectivity.type",
            "properties.desired.$version",
            "properties.reported.temp",
        ]);
        (first, prop::option::of("[a-z_$][a-zA-Z0-9_]{0,6}")).prop_map(|(p, extra)| match extra {
            Some(seg) => format!("{p}.{seg}"),
            None => p.to_string(),
        })
    }

    fn arb_literal() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i32>().prop_map(|n| n.to_string()),
            (-1000.0f64..1000.0).prop_map(|x| format!("{x:?}")),
            "[a-zA-Z0-9 ']{0,8}".prop_map(|s| format!("'{}'", s.replace('\'', "''"))),
            "[a-zA-Z0-9 ]{0,8}".prop_map(|s| format!("\"{s}\"")),
            prop::sample::select(vec!["true", "FALSE", "null"]).prop_map(str::to_string),
        ]
    }

    fn arb_operand() -> impl Strategy<Value = String> {
        let atom = prop_oneof![arb_path(), arb_literal()];
        (
            atom.clone(),
            prop::option::of((prop::sample::select(vec!["+", "-", "*", "/", "%"]), atom)),
        )
            .prop_map(|(a, rest)| match rest {
                Some((op, b)) => format!("{a} {op} {b}"),
                None => a,
            })
    }

    fn arb_condition() -> impl Strategy<Value = String> {
        let cmp = prop::sample::select(vec!["=", "!=", "<>", "<", ">", "<=", ">="]);
        let leaf = prop_oneof![
            (arb_operand(), cmp, arb_operand()).prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            (
                arb_path(),
                prop::sample::select(vec!["IN", "NIN", "in", "NOT IN"]),
                prop::collection::vec(arb_literal(), 0..4)
            )
                .prop_map(|(p, kw, items)| format!("{p} {kw} [{}]", items.join(", "))),
            arb_path().prop_map(|p| format!("IS_DEFINED({p})")),
            arb_path().prop_map(|p| format!("is_null({p})")),
            (arb_path(), "[a-z]{0,4}").prop_map(|(p, s)| format!("STARTSWITH({p}, '{s}')")),
        ];
        leaf.prop_recursive(4, 16, 3, |inner| {
            prop_oneof![
                (
                    inner.clone(),
                    prop::sample::select(vec!["AND", "OR", "and"]),
                    inner.clone()
                )
                    .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
                inner.clone().prop_map(|c| format!("NOT ({c})")),
                inner.prop_map(|c| format!("({c})")),
            ]
        })
    }

    fn arb_query() -> impl Strategy<Value = String> {
        let source = prop::sample::select(vec!["devices", "devices.modules", "devices.jobs"]);
        let select = prop_oneof![
            Just("*".to_string()),
            prop::collection::vec(arb_path(), 1..4).prop_map(|paths| {
                paths
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("{p} AS c{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
            arb_path().prop_map(|p| format!("COUNT() AS n, AVG({p}) AS a, MAX({p}) AS m")),
        ];
        (
            prop::option::of(0u32..100),
            select,
            source,
            prop::option::of(arb_condition()),
            prop::bool::ANY,
        )
            .prop_map(|(top, select, source, cond, group)| {
                let mut q = String::from("SELECT ");
                if let Some(n) = top {
                    q.push_str(&format!("TOP {n} "));
                }
                let grouped = group && select.starts_with("COUNT");
                q.push_str(&select);
                q.push_str(" FROM ");
                q.push_str(source);
                if let Some(c) = cond {
                    q.push_str(" WHERE ");
                    q.push_str(&c);
                }
                if grouped {
                    q.push_str(" GROUP BY status");
                }
                q
            })
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = parse(&text);
            let _ = parse_condition(&text);
        }

        #[test]
        fn arbitrary_query_like_text_never_panics(
            words in prop::collection::vec(
                prop::sample::select(vec![
                    "SELECT", "TOP", "*", "FROM", "devices", ".", "modules", "WHERE", "GROUP", "BY",
                    "AND", "OR", "NOT", "IN", "NIN", "(", ")", "[", "]", ",", "=", "!=", "<", ">=",
                    "+", "-", "/", "%", "a", "b.c", "1", "2.5", "'x'", "COUNT", "AVG", "AS",
                    "IS_DEFINED", "null", "true",
                ]),
                0..40,
            )
        ) {
            let text = words.join(" ");
            if let Ok(q) = parse(&text) {
                let docs = twins();
                prop_assert!(q.execute(&docs).is_ok());
            }
            if let Ok(c) = parse_condition(&text) {
                for doc in twins() {
                    let _ = c.matches(&doc);
                }
            }
        }

        #[test]
        fn generated_valid_queries_parse_and_run(query in arb_query()) {
            let parsed = parse(&query);
            prop_assert!(parsed.is_ok(), "{query}: {:?}", parsed.err());
            let docs = twins();
            let result = parsed.map(|q| q.execute(&docs));
            prop_assert!(matches!(result, Ok(Ok(_))));
        }

        #[test]
        fn generated_conditions_parse(cond in arb_condition()) {
            prop_assert!(parse_condition(&cond).is_ok(), "{cond}");
        }
    }
}
