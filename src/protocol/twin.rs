//! The device twin document model: validating patches against IoT Hub's limits, merging them
//! (JSON merge patch: `null` deletes), versioning, and the `$metadata` tree.
//!
//! Limits (protocol doc section 5): desired and reported 32 KB, tags 8 KB, measured as the compact
//! JSON of the section's properties without `$version`/`$metadata`; keys up to 1024 bytes, no
//! control characters, `.`, `$` or space, not empty; strings up to 4096 bytes; integers within
//! ±4503599627370495 (floats are not range-checked); depth up to 10. Depth: the section object is
//! depth 0 and every nested object or array adds 1, so `{"a":{"b":1}}` has depth 1 at `a`; arrays
//! count as a level like objects (a conservative reading; the docs only speak of objects). A patch
//! may carry top-level `$version` and `$metadata` keys (desired patches echo `$version`); they are
//! ignored. No clock is read here: callers pass the timestamp.

use serde_json::{Map, Value};

pub const MAX_DEPTH: usize = 10;
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_STRING_BYTES: usize = 4096;
pub const MAX_SAFE_INTEGER: i64 = 4_503_599_627_370_495;
/// The timestamp Azure shows for "never"; used when no `$lastUpdated` is known.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

const VERSION_KEY: &str = "$version";
const METADATA_KEY: &str = "$metadata";
const LAST_UPDATED: &str = "$lastUpdated";
const LAST_UPDATED_VERSION: &str = "$lastUpdatedVersion";

/// A part of the twin that takes patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Desired,
    Reported,
    Tags,
}

impl Section {
    /// The size limit in bytes of the section's compact JSON.
    pub fn size_limit(self) -> usize {
        match self {
            Section::Desired | Section::Reported => 32 * 1024,
            Section::Tags => 8 * 1024,
        }
    }

    /// The section's path in the service twin JSON, used in error messages.
    pub fn path(self) -> &'static str {
        match self {
            Section::Desired => "properties.desired",
            Section::Reported => "properties.reported",
            Section::Tags => "tags",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Section::Desired => "desired properties",
            Section::Reported => "reported properties",
            Section::Tags => "tags",
        }
    }
}

/// Why a twin document or patch was refused; each variant says which limit broke and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("the body is empty; expected a JSON object")]
    EmptyBody,
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("{0} must be a JSON object")]
    NotAnObject(String),
    #[error("empty key at {0}")]
    EmptyKey(String),
    #[error("key at {path} is {len} bytes, over the {MAX_KEY_BYTES}-byte limit")]
    KeyTooLong { path: String, len: usize },
    #[error("key {key:?} at {path} contains {ch:?}, which is not allowed")]
    InvalidKeyChar { path: String, key: String, ch: char },
    #[error("depth {depth} exceeds the limit of {MAX_DEPTH} at {path}")]
    TooDeep { path: String, depth: usize },
    #[error("string at {path} is {len} bytes, over the {MAX_STRING_BYTES}-byte limit")]
    StringTooLong { path: String, len: usize },
    #[error("integer {value} at {path} is outside ±{MAX_SAFE_INTEGER}")]
    IntegerOutOfRange { path: String, value: String },
    #[error("{section} are {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        section: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("{0} $version cannot grow any more")]
    VersionOverflow(&'static str),
}

/// Parses a request body as JSON; surrounding whitespace is trimmed and an empty body is an error.
pub fn parse_patch(bytes: &[u8]) -> Result<Value, TwinError> {
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Err(TwinError::EmptyBody);
    }
    serde_json::from_slice(trimmed).map_err(|e| TwinError::InvalidJson(e.to_string()))
}

/// Checks a patch (or a whole section document) against the key, depth, string and integer limits.
/// Size is checked on the merged result by `PropertySet`.
pub fn validate_patch(section: Section, patch: &Value) -> Result<(), TwinError> {
    let object = patch
        .as_object()
        .ok_or_else(|| TwinError::NotAnObject(section.path().to_string()))?;
    for (key, value) in object {
        if key == VERSION_KEY || key == METADATA_KEY {
            continue;
        }
        check_key(key, section.path())?;
        check_value(value, &format!("{}.{key}", section.path()), 1)?;
    }
    Ok(())
}

fn check_key(key: &str, parent: &str) -> Result<(), TwinError> {
    if key.is_empty() {
        return Err(TwinError::EmptyKey(parent.to_string()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(TwinError::KeyTooLong {
            path: parent.to_string(),
            len: key.len(),
        });
    }
    if let Some(ch) = key
        .chars()
        .find(|c| c.is_control() || matches!(c, '.' | '$' | ' '))
    {
        return Err(TwinError::InvalidKeyChar {
            path: parent.to_string(),
            key: key.to_string(),
            ch,
        });
    }
    Ok(())
}

/// `depth` is the depth `value` has if it is an object or array.
fn check_value(value: &Value, path: &str, depth: usize) -> Result<(), TwinError> {
    match value {
        Value::Object(map) => {
            check_depth(path, depth)?;
            for (key, child) in map {
                check_key(key, path)?;
                check_value(child, &format!("{path}.{key}"), depth + 1)?;
            }
        }
        Value::Array(items) => {
            check_depth(path, depth)?;
            for (i, item) in items.iter().enumerate() {
                check_value(item, &format!("{path}[{i}]"), depth + 1)?;
            }
        }
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            return Err(TwinError::StringTooLong {
                path: path.to_string(),
                len: s.len(),
            });
        }
        Value::Number(n) => {
            let in_range = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i.unsigned_abs() <= MAX_SAFE_INTEGER.unsigned_abs(),
                (None, Some(u)) => u <= MAX_SAFE_INTEGER.unsigned_abs(),
                (None, None) => true, // a float
            };
            if !in_range {
                return Err(TwinError::IntegerOutOfRange {
                    path: path.to_string(),
                    value: n.to_string(),
                });
            }
        }
        _ => {}
    }
    Ok(())
}

fn check_depth(path: &str, depth: usize) -> Result<(), TwinError> {
    if depth > MAX_DEPTH {
        return Err(TwinError::TooDeep {
            path: path.to_string(),
            depth,
        });
    }
    Ok(())
}

/// The compact JSON size of a section's properties.
pub fn section_size(properties: &Map<String, Value>) -> usize {
    serde_json::to_vec(properties)
        .expect("a JSON map with string keys always serializes")
        .len()
}

fn check_size(section: Section, properties: &Map<String, Value>) -> Result<(), TwinError> {
    let size = section_size(properties);
    if size > section.size_limit() {
        return Err(TwinError::TooLarge {
            section: section.label(),
            size,
            limit: section.size_limit(),
        });
    }
    Ok(())
}

/// RFC 7386 JSON merge patch: `null` deletes, an object merges into an object (or replaces a
/// non-object), anything else replaces. Key order is kept; new keys go last.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.shift_remove(key);
            }
            Value::Object(child_patch) => {
                let child = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !child.is_object() {
                    *child = Value::Object(Map::new());
                }
                if let Value::Object(child) = child {
                    merge_patch(child, child_patch);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The patch without its top-level `$version` / `$metadata` keys.
fn strip_reserved(patch: &Map<String, Value>) -> Map<String, Value> {
    patch
        .iter()
        .filter(|(k, _)| *k != VERSION_KEY && *k != METADATA_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What `$metadata` records for a touched node.
struct Stamp<'a> {
    now: &'a str,
    /// `$lastUpdatedVersion`, for desired properties only.
    version: Option<u64>,
}

impl Stamp<'_> {
    fn apply(&self, meta: &mut Map<String, Value>) {
        meta.insert(LAST_UPDATED.to_string(), Value::from(self.now));
        if let Some(v) = self.version {
            meta.insert(LAST_UPDATED_VERSION.to_string(), Value::from(v));
        }
    }

    fn leaf(&self) -> Value {
        let mut meta = Map::new();
        self.apply(&mut meta);
        Value::Object(meta)
    }
}

/// `merge_patch`, keeping `meta` (the metadata tree of `target`) in step: every touched node is
/// stamped, deleted nodes lose their metadata.
fn merge_with_metadata(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    stamp: &Stamp<'_>,
) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.shift_remove(key);
                meta.shift_remove(key);
            }
            Value::Object(child_patch) => {
                let child = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                let child_meta = meta
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !child.is_object() {
                    *child = Value::Object(Map::new());
                    // The old metadata described a leaf; start the object's afresh.
                    *child_meta = Value::Object(Map::new());
                }
                if !child_meta.is_object() {
                    *child_meta = Value::Object(Map::new());
                }
                if let (Value::Object(child), Value::Object(child_meta)) = (child, child_meta) {
                    merge_with_metadata(child, child_meta, child_patch, stamp);
                    stamp.apply(child_meta);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
                meta.insert(key.clone(), stamp.leaf());
            }
        }
    }
}

/// Metadata for a freshly written tree: every node stamped.
fn fresh_metadata(properties: &Map<String, Value>, stamp: &Stamp<'_>) -> Map<String, Value> {
    let mut meta = Map::new();
    stamp.apply(&mut meta);
    for (key, value) in properties {
        let node = match value {
            Value::Object(child) => Value::Object(fresh_metadata(child, stamp)),
            _ => stamp.leaf(),
        };
        meta.insert(key.clone(), node);
    }
    meta
}

/// Desired or reported properties (or tags) with their `$version` and `$metadata`.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertySet {
    pub properties: Map<String, Value>,
    /// Starts at 1, grows by one with every accepted patch or replacement.
    pub version: u64,
    /// Mirrors `properties`: `$lastUpdated` (and `$lastUpdatedVersion` for desired) at the top,
    /// on every object and on every leaf.
    pub metadata: Map<String, Value>,
}

impl Default for PropertySet {
    /// Empty, version 1, no metadata yet (`to_json` then shows `$lastUpdated` as `NEVER`).
    fn default() -> Self {
        Self {
            properties: Map::new(),
            version: 1,
            metadata: Map::new(),
        }
    }
}

impl PropertySet {
    /// Empty, version 1, created at `now_iso`.
    pub fn new(now_iso: &str) -> Self {
        let mut set = Self::default();
        set.metadata
            .insert(LAST_UPDATED.to_string(), Value::from(now_iso));
        set
    }

    fn next_version(&self, section: Section) -> Result<u64, TwinError> {
        self.version
            .checked_add(1)
            .ok_or(TwinError::VersionOverflow(section.label()))
    }

    /// Validates and merges `patch`, bumps the version and stamps the metadata. On any error the
    /// set is left unchanged.
    pub fn apply_patch(
        &mut self,
        patch: &Value,
        section: Section,
        now_iso: &str,
    ) -> Result<(), TwinError> {
        validate_patch(section, patch)?;
        let patch = patch
            .as_object()
            .ok_or_else(|| TwinError::NotAnObject(section.path().to_string()))?;
        let version = self.next_version(section)?;
        let stamp = Stamp {
            now: now_iso,
            version: (section == Section::Desired).then_some(version),
        };
        let mut properties = self.properties.clone();
        let mut metadata = self.metadata.clone();
        merge_with_metadata(
            &mut properties,
            &mut metadata,
            &strip_reserved(patch),
            &stamp,
        );
        check_size(section, &properties)?;
        stamp.apply(&mut metadata);
        self.properties = properties;
        self.metadata = metadata;
        self.version = version;
        Ok(())
    }

    /// Replaces the whole section with `doc` (top-level `$version`/`$metadata` ignored, `null`
    /// values dropped), bumps the version and stamps every node. On error nothing changes.
    pub fn replace(
        &mut self,
        doc: &Value,
        section: Section,
        now_iso: &str,
    ) -> Result<(), TwinError> {
        validate_patch(section, doc)?;
        let doc = doc
            .as_object()
            .ok_or_else(|| TwinError::NotAnObject(section.path().to_string()))?;
        let version = self.next_version(section)?;
        let stamp = Stamp {
            now: now_iso,
            version: (section == Section::Desired).then_some(version),
        };
        let mut properties = Map::new();
        merge_patch(&mut properties, &strip_reserved(doc));
        check_size(section, &properties)?;
        self.metadata = fresh_metadata(&properties, &stamp);
        self.properties = properties;
        self.version = version;
        Ok(())
    }

    /// The section as IoT Hub shows it: the properties, then `$metadata` when asked, then
    /// `$version`. The metadata tree is built to mirror the properties exactly, with `$lastUpdated`
    /// on every level (inherited from the parent where none was recorded).
    pub fn to_json(&self, with_metadata: bool) -> Value {
        let mut out = self.properties.clone();
        if with_metadata {
            let never = Value::from(NEVER);
            let view = metadata_view(&self.properties, &self.metadata, &never, None);
            out.insert(METADATA_KEY.to_string(), Value::Object(view));
        }
        out.insert(VERSION_KEY.to_string(), Value::from(self.version));
        Value::Object(out)
    }
}

fn metadata_view(
    properties: &Map<String, Value>,
    meta: &Map<String, Value>,
    inherited_time: &Value,
    inherited_version: Option<&Value>,
) -> Map<String, Value> {
    let time = meta.get(LAST_UPDATED).unwrap_or(inherited_time);
    let version = meta.get(LAST_UPDATED_VERSION).or(inherited_version);
    let mut view = Map::new();
    view.insert(LAST_UPDATED.to_string(), time.clone());
    if let Some(v) = version {
        view.insert(LAST_UPDATED_VERSION.to_string(), v.clone());
    }
    let no_meta = Map::new();
    for (key, value) in properties {
        let child_meta = meta.get(key).and_then(Value::as_object).unwrap_or(&no_meta);
        let node = match value {
            Value::Object(child) => metadata_view(child, child_meta, time, version),
            _ => metadata_view(&Map::new(), child_meta, time, version),
        };
        view.insert(key.clone(), Value::Object(node));
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const T1: &str = "2024-01-01T00:00:00Z";
    const T2: &str = "2024-01-02T00:00:00Z";

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn nested(depth: usize) -> Value {
        // `depth` nested objects under the section: {"l1":{"l2":...{"ldepth":{"x":1}}}}
        let mut v = json!({"x": 1});
        for i in (1..=depth).rev() {
            v = json!({ format!("l{i}"): v });
        }
        v
    }

    #[test]
    fn parse_patch_trims_and_rejects() {
        assert_eq!(parse_patch(b"  {\"a\":1}\n").unwrap(), json!({"a": 1}));
        assert_eq!(parse_patch(b" "), Err(TwinError::EmptyBody));
        assert_eq!(parse_patch(b""), Err(TwinError::EmptyBody));
        assert!(matches!(parse_patch(b"{"), Err(TwinError::InvalidJson(_))));
    }

    #[test]
    fn validate_accepts_reasonable_patches_and_top_level_version() {
        validate_patch(
            Section::Desired,
            &json!({"$version": 4, "$metadata": {}, "a": {"b": [1, "x", {"c": null}]}, "d": null, "e": 1.5e300}),
        )
        .unwrap();
        validate_patch(Section::Reported, &nested(10)).unwrap();
        validate_patch(
            Section::Tags,
            &json!({"n": MAX_SAFE_INTEGER, "m": -MAX_SAFE_INTEGER}),
        )
        .unwrap();
    }

    #[test]
    fn validate_errors_say_what_and_where() {
        let err = |section, v: Value| validate_patch(section, &v).unwrap_err().to_string();
        assert_eq!(
            err(Section::Reported, json!([1])),
            "properties.reported must be a JSON object"
        );
        assert_eq!(
            err(Section::Reported, json!({"a": {"b.c": 1}})),
            "key \"b.c\" at properties.reported.a contains '.', which is not allowed"
        );
        assert_eq!(
            err(Section::Desired, json!({"a": {"$version": 1}})),
            "key \"$version\" at properties.desired.a contains '$', which is not allowed"
        );
        assert_eq!(
            err(Section::Tags, json!({"a b": 1})),
            "key \"a b\" at tags contains ' ', which is not allowed"
        );
        assert_eq!(
            err(Section::Tags, json!({"a\u{1}": 1})),
            "key \"a\\u{1}\" at tags contains '\\u{1}', which is not allowed"
        );
        assert_eq!(err(Section::Tags, json!({"": 1})), "empty key at tags");
        assert_eq!(
            err(Section::Tags, json!({"k".repeat(1025): 1})),
            "key at tags is 1025 bytes, over the 1024-byte limit"
        );
        assert_eq!(
            err(Section::Reported, nested(11)),
            "depth 11 exceeds the limit of 10 at properties.reported.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.l11"
        );
        assert_eq!(
            err(Section::Reported, json!({"a": [[[[[[[[[[[1]]]]]]]]]]]})),
            "depth 11 exceeds the limit of 10 at properties.reported.a[0][0][0][0][0][0][0][0][0][0]"
        );
        assert_eq!(
            err(Section::Desired, json!({"s": "x".repeat(4097)})),
            "string at properties.desired.s is 4097 bytes, over the 4096-byte limit"
        );
        assert_eq!(
            err(Section::Desired, json!({"a": [1, 4503599627370496i64]})),
            "integer 4503599627370496 at properties.desired.a[1] is outside ±4503599627370495"
        );
        assert!(matches!(
            validate_patch(Section::Desired, &json!({"a": -4503599627370496i64})),
            Err(TwinError::IntegerOutOfRange { .. })
        ));
        assert!(matches!(
            validate_patch(Section::Desired, &json!({"a": u64::MAX})),
            Err(TwinError::IntegerOutOfRange { .. })
        ));
    }

    #[test]
    fn apply_patch_merges_versions_and_stamps_metadata() {
        let mut set = PropertySet::new(T1);
        assert_eq!(set.version, 1);
        set.apply_patch(
            &json!({"a": {"b": 1, "c": 2}, "d": "x"}),
            Section::Desired,
            T1,
        )
        .unwrap();
        assert_eq!(set.version, 2);
        set.apply_patch(
            &json!({"$version": 99, "a": {"b": null}, "e": true}),
            Section::Desired,
            T2,
        )
        .unwrap();
        assert_eq!(set.version, 3);
        assert_eq!(
            Value::Object(set.properties.clone()),
            json!({"a": {"c": 2}, "d": "x", "e": true})
        );
        let doc = set.to_json(true);
        assert_eq!(doc["$version"], json!(3));
        let meta = &doc["$metadata"];
        assert_eq!(meta["$lastUpdated"], json!(T2));
        assert_eq!(meta["$lastUpdatedVersion"], json!(3));
        assert_eq!(meta["a"]["$lastUpdated"], json!(T2));
        assert_eq!(meta["a"]["c"]["$lastUpdated"], json!(T1));
        assert_eq!(meta["a"]["c"]["$lastUpdatedVersion"], json!(2));
        assert!(meta["a"].get("b").is_none());
        assert_eq!(meta["d"]["$lastUpdated"], json!(T1));
        assert_eq!(meta["e"]["$lastUpdatedVersion"], json!(3));
        assert!(
            set.metadata["a"].get("b").is_none(),
            "deleted node's metadata is gone"
        );
        assert_eq!(
            set.to_json(false),
            json!({"a": {"c": 2}, "d": "x", "e": true, "$version": 3})
        );
    }

    #[test]
    fn reported_metadata_has_no_version_and_scalar_object_swaps_work() {
        let mut set = PropertySet::default();
        set.apply_patch(&json!({"a": 1}), Section::Reported, T1)
            .unwrap();
        set.apply_patch(&json!({"a": {"b": 2}}), Section::Reported, T2)
            .unwrap();
        assert_eq!(
            set.to_json(true)["$metadata"],
            json!({
                "$lastUpdated": T2, "a": {"$lastUpdated": T2, "b": {"$lastUpdated": T2}}
            })
        );
        set.apply_patch(&json!({"a": [1, 2]}), Section::Reported, T1)
            .unwrap();
        assert_eq!(
            set.to_json(true)["$metadata"]["a"],
            json!({"$lastUpdated": T1})
        );
        assert_eq!(set.version, 4);
    }

    #[test]
    fn default_shows_never_as_last_updated() {
        let set = PropertySet::default();
        assert_eq!(
            set.to_json(true),
            json!({"$metadata": {"$lastUpdated": NEVER}, "$version": 1})
        );
    }

    #[test]
    fn size_limit_is_checked_on_the_result_and_failure_changes_nothing() {
        let mut set = PropertySet::new(T1);
        let chunk = "x".repeat(4000);
        for i in 0..8 {
            set.apply_patch(&json!({ format!("k{i}"): chunk }), Section::Reported, T1)
                .unwrap();
        }
        let before = set.clone();
        let err = set
            .apply_patch(&json!({"k8": chunk}), Section::Reported, T2)
            .unwrap_err();
        assert!(matches!(
            err,
            TwinError::TooLarge {
                section: "reported properties",
                limit: 32768,
                ..
            }
        ));
        assert!(
            err.to_string().starts_with("reported properties are 3"),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("bytes, over the 32768-byte limit"),
            "{err}"
        );
        assert_eq!(set, before);
        // Deleting in the same patch makes room.
        set.apply_patch(&json!({"k0": null, "k8": chunk}), Section::Reported, T2)
            .unwrap();

        let mut tags = PropertySet::default();
        let err = tags
            .replace(
                &json!({"a": chunk, "b": chunk, "c": chunk}),
                Section::Tags,
                T1,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            TwinError::TooLarge {
                section: "tags",
                limit: 8192,
                ..
            }
        ));
        assert_eq!(tags, PropertySet::default());
    }

    #[test]
    fn replace_swaps_everything_and_bumps_version() {
        let mut set = PropertySet::new(T1);
        set.apply_patch(&json!({"old": 1}), Section::Desired, T1)
            .unwrap();
        set.replace(
            &json!({"$version": 1, "new": {"x": 1}, "gone": null}),
            Section::Desired,
            T2,
        )
        .unwrap();
        assert_eq!(set.to_json(false), json!({"new": {"x": 1}, "$version": 3}));
        assert_eq!(
            set.to_json(true)["$metadata"],
            json!({
                "$lastUpdated": T2, "$lastUpdatedVersion": 3,
                "new": {"$lastUpdated": T2, "$lastUpdatedVersion": 3,
                        "x": {"$lastUpdated": T2, "$lastUpdatedVersion": 3}}
            })
        );
        assert_eq!(
            set.replace(&json!("no"), Section::Desired, T2),
            Err(TwinError::NotAnObject("properties.desired".into()))
        );
    }

    #[test]
    fn version_overflow_is_an_error_not_a_wrap() {
        let mut set = PropertySet {
            version: u64::MAX,
            ..PropertySet::default()
        };
        let err = set
            .apply_patch(&json!({"a": 1}), Section::Reported, T1)
            .unwrap_err();
        assert_eq!(err, TwinError::VersionOverflow("reported properties"));
        assert_eq!(set.version, u64::MAX);
        assert!(set.properties.is_empty());
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The examples of RFC 7386 appendix A, a selection.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
            (
                json!({"a": "x"}),
                json!({"a": {"b": null, "c": 1}}),
                json!({"a": {"c": 1}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut t = obj(target);
            merge_patch(&mut t, &obj(patch));
            assert_eq!(Value::Object(t), expected);
        }
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-1000i64..1000).prop_map(Value::from),
            "[a-z ]{0,6}".prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map("[a-d]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn patch() -> impl Strategy<Value = Map<String, Value>> {
        proptest::collection::btree_map("[a-d]", value(), 0..5)
            .prop_map(|m| m.into_iter().collect())
    }

    /// Every object level of the metadata view has `$lastUpdated` and the same keys as the data.
    fn metadata_mirrors(props: &Map<String, Value>, meta: &Map<String, Value>) -> bool {
        let keys_match = meta.keys().filter(|k| !k.starts_with('$')).eq(props.keys());
        keys_match
            && meta.contains_key(LAST_UPDATED)
            && props.iter().all(|(k, v)| match (v, meta.get(k)) {
                (Value::Object(child), Some(Value::Object(m))) => metadata_mirrors(child, m),
                (_, Some(Value::Object(m))) => m.contains_key(LAST_UPDATED),
                _ => false,
            })
    }

    proptest! {
        #[test]
        fn apply_patch_equals_merge_patch(first in patch(), second in patch()) {
            let mut set = PropertySet::new(T1);
            let mut expected = Map::new();
            for (p, now) in [(&first, T1), (&second, T2)] {
                let before = set.version;
                set.apply_patch(&Value::Object(p.clone()), Section::Desired, now).unwrap();
                merge_patch(&mut expected, p);
                prop_assert_eq!(&set.properties, &expected);
                prop_assert_eq!(set.version, before + 1);
                for (k, v) in p {
                    if v.is_null() {
                        prop_assert!(!set.properties.contains_key(k));
                    }
                }
                let doc = set.to_json(true);
                let view = doc[METADATA_KEY].as_object().unwrap();
                prop_assert!(metadata_mirrors(&set.properties, view));
            }
        }

        #[test]
        fn failed_patch_leaves_the_set_unchanged(
            first in patch(),
            second in patch(),
            bad_key in prop_oneof![Just("a.b"), Just("$x"), Just("a b"), Just("")],
        ) {
            let mut set = PropertySet::new(T1);
            set.apply_patch(&Value::Object(first), Section::Reported, T1).unwrap();
            let before = set.clone();
            let mut bad = second;
            bad.insert(bad_key.to_string(), json!(1));
            prop_assert!(set.apply_patch(&Value::Object(bad), Section::Reported, T2).is_err());
            prop_assert_eq!(set, before);
        }
    }
}
