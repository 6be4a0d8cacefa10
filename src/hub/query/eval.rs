//! Evaluator: runs a parsed query over twin or job documents held in memory. Pure functions
//! over `serde_json::Value`; no I/O, no paging (callers page the returned rows).
//!
//! Semantics follow IoT Hub (which follows Cosmos DB): a missing path is *undefined*, and any
//! comparison or arithmetic involving undefined, or values of different types, is undefined as
//! well. A document matches only when its condition is exactly `true`, so `x != 1` and
//! `NOT (x = 1)` do not match a document without `x`. `AND`/`OR` are three-valued:
//! `false AND undefined` is false and `true OR undefined` is true.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::{Map, Number, Value};

use super::parser::{Aggregate, ArithOp, CmpOp, Column, Expr, Func, Output, Path, Segment, Select};

/// Whether a condition holds for `doc`: it must evaluate to exactly `true`.
pub(crate) fn matches(condition: &Expr, doc: &Value) -> bool {
    matches!(eval(condition, doc), Some(Value::Bool(true)))
}

/// Builds the result rows for `select` from the documents that passed the WHERE clause.
pub(crate) fn rows<'a>(
    select: &Select,
    docs: impl Iterator<Item = &'a Value>,
    top: usize,
) -> Vec<Value> {
    match select {
        Select::All => docs.take(top).cloned().collect(),
        Select::Columns(columns) => docs.take(top).map(|doc| project(columns, doc)).collect(),
        Select::Aggregated { outputs, group_by } => {
            let mut rows = aggregate(outputs, group_by, docs);
            rows.truncate(top);
            rows
        }
    }
}

/// One row per document; columns whose value is undefined are left out.
fn project(columns: &[Column], doc: &Value) -> Value {
    let mut row = Map::new();
    for column in columns {
        if let Some(value) = eval(&column.expr, doc) {
            row.insert(column.name.clone(), value);
        }
    }
    Value::Object(row)
}

/// One group: the values of the GROUP BY paths and one accumulator per aggregate output.
struct Group {
    key: Vec<Option<Value>>,
    accumulators: Vec<Accumulator>,
}

fn aggregate<'a>(
    outputs: &[Output],
    group_by: &[Path],
    docs: impl Iterator<Item = &'a Value>,
) -> Vec<Value> {
    let new_accumulators = || -> Vec<Accumulator> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::Agg { agg, .. } => Some(Accumulator::new(agg)),
                Output::Key { .. } => None,
            })
            .collect()
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    if group_by.is_empty() {
        // Without GROUP BY there is exactly one row, even over no documents (`COUNT()` is 0).
        groups.push(Group {
            key: Vec::new(),
            accumulators: new_accumulators(),
        });
    }
    for doc in docs {
        let slot = if group_by.is_empty() {
            0
        } else {
            let key: Vec<Option<Value>> =
                group_by.iter().map(|p| resolve(p, doc).cloned()).collect();
            let text = key_text(&key);
            *index.entry(text).or_insert_with(|| {
                groups.push(Group {
                    key,
                    accumulators: new_accumulators(),
                });
                groups.len() - 1
            })
        };
        let group = &mut groups[slot];
        let aggs = outputs.iter().filter_map(|output| match output {
            Output::Agg { agg, .. } => Some(agg),
            Output::Key { .. } => None,
        });
        for (acc, agg) in group.accumulators.iter_mut().zip(aggs) {
            acc.add(agg, doc);
        }
    }
    groups
        .into_iter()
        .map(|group| {
            let mut row = Map::new();
            let mut finished = group.accumulators.into_iter().map(Accumulator::finish);
            for output in outputs {
                let (name, value) = match output {
                    Output::Key { name, index } => (name, group.key.get(*index).cloned().flatten()),
                    Output::Agg { name, .. } => (name, finished.next().flatten()),
                };
                if let Some(value) = value {
                    row.insert(name.clone(), value);
                }
            }
            Value::Object(row)
        })
        .collect()
}

/// A hashable rendering of a group key. `!` is not valid JSON, so undefined cannot collide
/// with a value, and JSON text never holds a raw U+0001, so the separator cannot either.
fn key_text(key: &[Option<Value>]) -> String {
    let parts: Vec<String> = key
        .iter()
        .map(|part| match part {
            Some(value) => value.to_string(),
            None => "!".to_string(),
        })
        .collect();
    parts.join("\u{1}")
}

/// Running state of one aggregate over one group.
enum Accumulator {
    Count(u64),
    /// Integer sum while every value is an integer and nothing overflowed; the float sum always.
    Sum {
        int: Option<i64>,
        float: f64,
    },
    Avg {
        total: f64,
        count: u64,
    },
    Min(Option<Value>),
    Max(Option<Value>),
}

impl Accumulator {
    fn new(agg: &Aggregate) -> Self {
        match agg {
            Aggregate::Count => Accumulator::Count(0),
            Aggregate::Sum(_) => Accumulator::Sum {
                int: Some(0),
                float: 0.0,
            },
            Aggregate::Avg(_) => Accumulator::Avg {
                total: 0.0,
                count: 0,
            },
            Aggregate::Min(_) => Accumulator::Min(None),
            Aggregate::Max(_) => Accumulator::Max(None),
        }
    }

    /// Folds in one document. SUM and AVG skip values that are not numbers; MIN and MAX
    /// consider booleans, numbers and strings (ordered in that type order) and skip the rest.
    fn add(&mut self, agg: &Aggregate, doc: &Value) {
        let value = match agg {
            Aggregate::Count => None,
            Aggregate::Sum(e) | Aggregate::Avg(e) | Aggregate::Min(e) | Aggregate::Max(e) => {
                eval(e, doc)
            }
        };
        match self {
            Accumulator::Count(n) => *n += 1,
            Accumulator::Sum { int, float } => {
                if let Some(Value::Number(n)) = &value {
                    *int = match (*int, n.as_i64()) {
                        (Some(sum), Some(i)) => sum.checked_add(i),
                        _ => None,
                    };
                    *float += n.as_f64().unwrap_or(0.0);
                }
            }
            Accumulator::Avg { total, count } => {
                if let Some(Value::Number(n)) = &value {
                    *total += n.as_f64().unwrap_or(0.0);
                    *count += 1;
                }
            }
            Accumulator::Min(best) | Accumulator::Max(best) => {
                let Some(value) = value else { return };
                let want = if matches!(agg, Aggregate::Min(_)) {
                    Ordering::Less
                } else {
                    Ordering::Greater
                };
                let better = match best {
                    None => rank(&value).is_some(),
                    Some(current) => extreme_cmp(&value, current) == Some(want),
                };
                if better {
                    *best = Some(value);
                }
            }
        }
    }

    fn finish(self) -> Option<Value> {
        match self {
            Accumulator::Count(n) => Some(Value::from(n)),
            Accumulator::Sum { int: Some(i), .. } => Some(Value::from(i)),
            Accumulator::Sum { int: None, float } => number_from_f64(float),
            Accumulator::Avg { count: 0, .. } => None,
            Accumulator::Avg { total, count } => number_from_f64(total / count as f64),
            Accumulator::Min(v) | Accumulator::Max(v) => v,
        }
    }
}

/// Type order for MIN/MAX: booleans < numbers < strings; other values do not take part.
fn rank(value: &Value) -> Option<u8> {
    match value {
        Value::Bool(_) => Some(0),
        Value::Number(_) => Some(1),
        Value::String(_) => Some(2),
        _ => None,
    }
}

fn extreme_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    let (ra, rb) = (rank(a)?, rank(b)?);
    if ra != rb {
        return Some(ra.cmp(&rb));
    }
    order(a, b)
}

/// Walks a path through objects and arrays; `None` when any step is missing.
pub(crate) fn resolve<'a>(path: &Path, doc: &'a Value) -> Option<&'a Value> {
    let mut current = doc;
    for segment in &path.segments {
        current = match (segment, current) {
            (Segment::Key(key), Value::Object(map)) => map.get(key)?,
            (Segment::Index(i), Value::Array(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Evaluates an expression; `None` is undefined.
pub(crate) fn eval(expr: &Expr, doc: &Value) -> Option<Value> {
    match expr {
        Expr::Literal(value) => Some(value.clone()),
        Expr::Path(path) => resolve(path, doc).cloned(),
        Expr::Neg(inner) => match eval(inner, doc)? {
            Value::Number(n) => negate(&n),
            _ => None,
        },
        Expr::Not(inner) => match eval(inner, doc)? {
            Value::Bool(b) => Some(Value::Bool(!b)),
            _ => None,
        },
        Expr::And(terms) => {
            let mut all_true = true;
            for term in terms {
                match eval(term, doc) {
                    Some(Value::Bool(false)) => return Some(Value::Bool(false)),
                    Some(Value::Bool(true)) => {}
                    _ => all_true = false,
                }
            }
            all_true.then_some(Value::Bool(true))
        }
        Expr::Or(terms) => {
            let mut all_false = true;
            for term in terms {
                match eval(term, doc) {
                    Some(Value::Bool(true)) => return Some(Value::Bool(true)),
                    Some(Value::Bool(false)) => {}
                    _ => all_false = false,
                }
            }
            all_false.then_some(Value::Bool(false))
        }
        Expr::Arith(op, left, right) => {
            let (Value::Number(a), Value::Number(b)) = (eval(left, doc)?, eval(right, doc)?) else {
                return None;
            };
            arithmetic(*op, &a, &b)
        }
        Expr::Compare(op, left, right) => {
            let (a, b) = (eval(left, doc)?, eval(right, doc)?);
            compare(*op, &a, &b).map(Value::Bool)
        }
        Expr::In {
            negated,
            value,
            list,
        } => {
            let value = eval(value, doc)?;
            let found = list
                .iter()
                .any(|item| eval(item, doc).is_some_and(|v| equal(&value, &v) == Some(true)));
            Some(Value::Bool(found != *negated))
        }
        Expr::Call(func, args) => call(*func, args, doc),
    }
}

fn call(func: Func, args: &[Expr], doc: &Value) -> Option<Value> {
    let arg = |i: usize| args.get(i).and_then(|e| eval(e, doc));
    let is = |pred: fn(&Value) -> bool| Some(Value::Bool(arg(0).as_ref().is_some_and(pred)));
    match func {
        Func::IsDefined => Some(Value::Bool(arg(0).is_some())),
        Func::IsNull => is(Value::is_null),
        Func::IsString => is(Value::is_string),
        Func::IsNumber => is(Value::is_number),
        Func::IsBool => is(Value::is_boolean),
        Func::IsObject => is(Value::is_object),
        Func::IsArray => is(Value::is_array),
        Func::StartsWith | Func::EndsWith | Func::Contains => {
            let (Some(Value::String(text)), Some(Value::String(part))) = (arg(0), arg(1)) else {
                return None;
            };
            let result = match func {
                Func::StartsWith => text.starts_with(part.as_str()),
                Func::EndsWith => text.ends_with(part.as_str()),
                _ => text.contains(part.as_str()),
            };
            Some(Value::Bool(result))
        }
    }
}

/// `None` when the two values cannot be compared with `op` (different types, or an ordering
/// of nulls, objects or arrays).
fn compare(op: CmpOp, a: &Value, b: &Value) -> Option<bool> {
    match op {
        CmpOp::Eq => equal(a, b),
        CmpOp::Ne => equal(a, b).map(|eq| !eq),
        CmpOp::Lt => order(a, b).map(Ordering::is_lt),
        CmpOp::Gt => order(a, b).map(Ordering::is_gt),
        CmpOp::Le => order(a, b).map(Ordering::is_le),
        CmpOp::Ge => order(a, b).map(Ordering::is_ge),
    }
}

/// Equality of two values of the same type; numbers compare by value (`1 = 1.0`).
fn equal(a: &Value, b: &Value) -> Option<bool> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => Some(number_cmp(x, y) == Some(Ordering::Equal)),
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null)
        | (Value::Array(_), Value::Array(_))
        | (Value::Object(_), Value::Object(_)) => Some(a == b),
        _ => None,
    }
}

/// Ordering of two numbers, two strings (by code point) or two booleans (`false < true`).
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn number_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

/// Integer arithmetic when both sides are integers and the result is exact; otherwise
/// floating point. Division or remainder by zero is undefined.
fn arithmetic(op: ArithOp, a: &Number, b: &Number) -> Option<Value> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        let exact = match op {
            ArithOp::Add => x.checked_add(y),
            ArithOp::Sub => x.checked_sub(y),
            ArithOp::Mul => x.checked_mul(y),
            ArithOp::Div if y == 0 => return None,
            ArithOp::Div => x
                .checked_rem(y)
                .filter(|r| *r == 0)
                .and_then(|_| x.checked_div(y)),
            ArithOp::Rem if y == 0 => return None,
            ArithOp::Rem => x.checked_rem(y),
        };
        if let Some(n) = exact {
            return Some(Value::from(n));
        }
    }
    let (x, y) = (a.as_f64()?, b.as_f64()?);
    let result = match op {
        ArithOp::Add => x + y,
        ArithOp::Sub => x - y,
        ArithOp::Mul => x * y,
        ArithOp::Div => x / y,
        ArithOp::Rem => x % y,
    };
    number_from_f64(result)
}

fn negate(n: &Number) -> Option<Value> {
    match n.as_i64().and_then(i64::checked_neg) {
        Some(i) => Some(Value::from(i)),
        None => number_from_f64(-n.as_f64()?),
    }
}

/// A JSON number from a float: integral values become integers (JSON does not tell `2` from
/// `2.0`, but clients decoding into typed languages do); NaN and infinities are undefined.
fn number_from_f64(x: f64) -> Option<Value> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if !x.is_finite() {
        return None;
    }
    if x.fract() == 0.0 && x.abs() < EXACT {
        return Some(Value::from(x as i64));
    }
    Number::from_f64(x).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use crate::hub::query::parse_condition;
    use serde_json::{json, Value};

    fn doc() -> Value {
        json!({
            "deviceId": "door-01",
            "version": 3,
            "ratio": 0.5,
            "name": "O'Brien",
            "on": true,
            "nothing": null,
            "tags": {"location": {"plant": "Redmond43"}, "list": [10, 20]},
            "properties": {"reported": {"temp": 21.5, "$version": 4}}
        })
    }

    /// Asserts that each condition gives `expected` on `doc()`.
    fn check(expected: bool, conditions: &[&str]) {
        let d = doc();
        for text in conditions {
            let cond = parse_condition(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(cond.matches(&d), expected, "{text}");
        }
    }

    #[test]
    fn comparisons_of_numbers() {
        check(
            true,
            &[
                "version = 3",
                "version = 3.0",
                "version != 4",
                "version <> 4",
                "version < 4",
                "version > 2.5",
                "version <= 3",
                "version >= 3",
                "ratio < 1",
                "ratio = 0.5",
                "properties.reported.$version = 4",
                "-1 < 0",
                "version > -10",
            ],
        );
        check(
            false,
            &[
                "version = 4",
                "version != 3",
                "version < 3",
                "version > 3",
                "version >= 3.5",
            ],
        );
    }

    #[test]
    fn comparisons_of_strings_and_booleans() {
        check(
            true,
            &[
                "deviceId = 'door-01'",
                "deviceId = \"door-01\"",
                "deviceId < 'door-02'",
                "deviceId >= 'door'",
                "name = 'O''Brien'",
                r"name = 'O\'Brien'",
                "on = true",
                "on = TRUE",
                "on != false",
                "false < true",
                "nothing = null",
            ],
        );
        check(
            false,
            &["deviceId = 'DOOR-01'", "deviceId > 'e'", "on = false"],
        );
    }

    #[test]
    fn missing_paths_and_mixed_types_never_match() {
        check(
            false,
            &[
                "missing = 1",
                "missing != 1",
                "missing <> 'x'",
                "missing < 1",
                "missing = null",
                "NOT (missing = 1)",
                "NOT missing = 1",
                "version = '3'",
                "version != '3'",
                "deviceId > 1",
                "on = 1",
                "nothing != 1",
                "nothing < 1",
                "tags.location.plant.deeper = 1",
                "DeviceId = 'door-01'",
            ],
        );
    }

    #[test]
    fn arithmetic() {
        check(
            true,
            &[
                "version + 1 = 4",
                "version - 5 = -2",
                "version * 2 = 6",
                "version / 2 = 1.5",
                "version / 3 = 1",
                "version % 2 = 1",
                "ratio * 4 = 2",
                "1 + 2 * 3 = 7",
                "(1 + 2) * 3 = 9",
                "-version = -3",
                "7 % 2.5 = 2",
                "9223372036854775807 + 1 > 9e18",
            ],
        );
        check(
            false,
            &[
                "version / 0 = 0",
                "version % 0 = 0",
                "deviceId + 1 = 1",
                "missing + 1 = 1",
            ],
        );
    }

    #[test]
    fn logic() {
        check(
            true,
            &[
                "version = 3 AND deviceId = 'door-01'",
                "version = 4 OR deviceId = 'door-01'",
                "NOT version = 4",
                "NOT (version = 4 OR version = 5)",
                "missing = 1 OR version = 3",
                "NOT (missing = 1 AND version = 4)",
                "on",
                "version = 3 and (on or missing)",
            ],
        );
        check(
            false,
            &[
                "version = 3 AND missing = 1",
                "version = 4 OR missing = 1",
                "NOT on",
                "NOT (missing = 1 OR version = 4)",
                "version",
                "deviceId",
            ],
        );
    }

    #[test]
    fn in_and_nin() {
        check(
            true,
            &[
                "deviceId IN ['door-01', 'door-02']",
                "deviceId IN ('door-01')",
                "version IN [1, 3.0]",
                "deviceId NIN ['door-02']",
                "deviceId NOT IN ['x']",
                "version NIN []",
                "version in [1 + 2]",
            ],
        );
        check(
            false,
            &[
                "deviceId IN []",
                "deviceId NIN ['door-01']",
                "missing IN [1]",
                "missing NIN [1]",
                "version IN ['3']",
            ],
        );
    }

    #[test]
    fn functions() {
        check(
            true,
            &[
                "IS_DEFINED(deviceId)",
                "is_defined(tags.location)",
                "NOT IS_DEFINED(missing)",
                "IS_DEFINED(nothing)",
                "IS_NULL(nothing)",
                "NOT IS_NULL(missing)",
                "IS_STRING(deviceId)",
                "IS_NUMBER(ratio)",
                "IS_BOOL(on)",
                "IS_OBJECT(tags)",
                "IS_ARRAY(tags.list)",
                "STARTSWITH(deviceId, 'door')",
                "ENDSWITH(deviceId, '-01')",
                "CONTAINS(tags.location.plant, 'mond')",
                "tags.list[1] = 20",
                "tags['location'].plant = 'Redmond43'",
            ],
        );
        check(
            false,
            &[
                "IS_DEFINED(missing)",
                "IS_STRING(version)",
                "STARTSWITH(deviceId, 'x')",
                "STARTSWITH(version, '3')",
                "NOT STARTSWITH(missing, 'x')",
                "tags.list[2] = 30",
            ],
        );
    }
}
