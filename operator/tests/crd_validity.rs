//! The CRDs in `crds/` checked the way kube-apiserver checks a
//! CustomResourceDefinition when it is created, for everything that can be
//! checked without a server.
//!
//! The kube-cel tests (`src/crd/cel_tests.rs`) evaluate the rules against
//! objects, and the in-memory API server takes any CRD; neither looks at the
//! CRD the way `kubectl apply -f crds/` makes the API server look at it. A
//! real v1.36 API server refused two of the three CRDs because a rule's
//! `fieldPath` (`.metadata.name`) did not resolve against the schema. This
//! file re-implements, from the apiextensions-apiserver sources, the checks
//! that decide such refusals:
//!
//! * strict decoding: every key of the CRD is a field of the v1 types
//!   (`kubectl apply` asks for strict field validation);
//! * CRD names, versions, printer columns and scale subresource paths;
//! * the structural schema rules (`ValidateStructural`): a `type` on every
//!   node except where `x-kubernetes-int-or-string` or
//!   `x-kubernetes-preserve-unknown-fields` allow none, `object` at the root,
//!   no `additionalProperties` at the root or together with `properties`,
//!   `metadata` restricting only `name`/`generateName` and only at the root,
//!   value validations (`allOf`/`anyOf`/`oneOf`/`not`) without generic or
//!   extension keywords and naming only fields the schema specifies; none of
//!   `$ref`, `definitions`, `dependencies`, `patternProperties`,
//!   `additionalItems`, `id`, `uniqueItems: true`, `type: null`; the
//!   `x-kubernetes-list-type`/`-map-type`/`-list-map-keys` invariants; the
//!   only fields allowed at the root when the status subresource is on;
//! * defaults and enum values valid against their schema, without fields
//!   that pruning would drop, and never inside top-level `metadata`;
//! * every `x-kubernetes-validations` rule: `rule`, `message`,
//!   `messageExpression`, `reason` and `fieldPath` as `validation.go` wants
//!   them, `fieldPath` resolved against the schema *at the rule's level* with
//!   the same tokenizer as `cel.ValidFieldPath` (`.a`, `['a']`, map keys
//!   through `additionalProperties`, nothing into arrays), `oldSelf` only
//!   where old and new values can be correlated (not under the items of a
//!   list that is not `x-kubernetes-list-type: map`), `optionalOldSelf` only
//!   with `oldSelf`;
//! * every CEL expression compiles (kube-cel), names only the variables a CRD
//!   rule has (`self`, `oldSelf`) and only fields its schema declares — at the
//!   root `apiVersion`, `kind`, `metadata.name` and `metadata.generateName`
//!   and no other metadata, as the API server's CEL type for a resource root;
//! * estimated cost: kube-cel's static estimate must not exceed its budget,
//!   and an estimate after cel-go's cost model for the functions these rules
//!   use (string traversal 0.1 per byte, regex 0.25 per pattern byte,
//!   comprehensions times the list size, unbounded sizes derived from the
//!   3 MiB request limit as the API server does), multiplied by how many
//!   times the rule can run (`maxItems`/`maxProperties` of the enclosing
//!   lists and maps), must stay under `StaticEstimatedCostLimit` per rule and
//!   `StaticEstimatedCRDCostLimit` per schema.
//!
//! `CRD_COST_DEBUG=1 cargo test -p starling-operator --test crd_validity --
//! --nocapture` prints each rule's estimated cost. What the checks cannot see
//! is listed at the end of this file.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_cel::cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use kube_cel::{ScopeContext, WarningKind};
use serde_json::{Map, Value, json};

/// `StaticEstimatedCostLimit`: the largest estimated cost of one rule.
const RULE_COST_LIMIT: u64 = 10_000_000;
/// `StaticEstimatedCRDCostLimit`: the largest total over one schema.
const CRD_COST_LIMIT: u64 = 100_000_000;
/// The API server's request size limit, from which it bounds strings, lists
/// and maps that declare no `maxLength`/`maxItems`/`maxProperties`.
const MAX_REQUEST_BYTES: u64 = 3 * 1024 * 1024;

/// Keys of `JSONSchemaProps` (apiextensions.k8s.io/v1).
const SCHEMA_KEYS: &[&str] = &[
    "$ref",
    "$schema",
    "additionalItems",
    "additionalProperties",
    "allOf",
    "anyOf",
    "default",
    "definitions",
    "dependencies",
    "description",
    "enum",
    "example",
    "exclusiveMaximum",
    "exclusiveMinimum",
    "externalDocs",
    "format",
    "id",
    "items",
    "maxItems",
    "maxLength",
    "maxProperties",
    "maximum",
    "minItems",
    "minLength",
    "minProperties",
    "minimum",
    "multipleOf",
    "not",
    "nullable",
    "oneOf",
    "pattern",
    "patternProperties",
    "properties",
    "required",
    "title",
    "type",
    "uniqueItems",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
];

/// Keys of a `ValidationRule`.
const RULE_KEYS: &[&str] = &[
    "rule",
    "message",
    "messageExpression",
    "reason",
    "fieldPath",
    "optionalOldSelf",
];

/// `allowedFieldsAtRootSchema` (in JSON spelling): what the root of a schema
/// may carry when the status subresource is enabled.
const ROOT_KEYS_WITH_STATUS: &[&str] = &[
    "description",
    "type",
    "format",
    "title",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "multipleOf",
    "required",
    "items",
    "properties",
    "externalDocs",
    "example",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
];

const OPENAPI_TYPES: &[&str] = &["array", "boolean", "integer", "number", "object", "string"];
const REASONS: &[&str] = &[
    "FieldValueInvalid",
    "FieldValueForbidden",
    "FieldValueRequired",
    "FieldValueDuplicate",
];
const PRINTER_TYPES: &[&str] = &["integer", "number", "string", "boolean", "date"];
const PRINTER_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "date",
    "date-time",
    "password",
];

/// Identifiers a CEL rule may use besides its variables: type names and the
/// namespaces of Kubernetes' CEL libraries.
const CEL_GLOBALS: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "type",
    "null_type",
    "timestamp",
    "duration",
    "optional",
    "sets",
    "math",
    "strings",
    "base64",
    "ip",
    "cidr",
    "quantity",
    "url",
    "semver",
    "format",
];

/// CEL's reserved words: a property so named is `__name__` in a rule.
const CEL_RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

// ---------------------------------------------------------------------------
// The checker

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Root,
    Item,
    Field,
}

/// Where in the schema a node sits.
#[derive(Clone)]
struct Ctx {
    /// Field path in the API server's notation
    /// (`spec.versions[0].schema.openAPIV3Schema.properties[spec]`).
    path: String,
    level: Level,
    /// The root of the resource or an `x-kubernetes-embedded-resource`: its
    /// `apiVersion`, `kind` and `metadata` are special.
    resource_root: bool,
    /// Inside `apiVersion`, `kind` or `metadata` of a resource.
    inside_meta: bool,
    /// Why defaults are forbidden here, if they are.
    no_defaults: Option<String>,
    /// The list whose items old and new objects cannot be matched by, if any.
    uncorrelatable: Option<String>,
    /// How many times a rule here can run per object.
    cardinality: u64,
}

impl Ctx {
    fn child(&self, segment: &str, level: Level) -> Ctx {
        Ctx {
            path: format!("{}.{segment}", self.path),
            level,
            resource_root: false,
            ..self.clone()
        }
    }
}

#[derive(Default)]
struct Checker {
    errors: Vec<String>,
    /// Total estimated cost of every rule of the schema being checked.
    total_cost: u64,
}

impl Checker {
    fn error(&mut self, path: &str, detail: impl AsRef<str>) {
        self.errors.push(format!("{path}: {}", detail.as_ref()));
    }

    /// Checks one CRD (as JSON) and returns what the API server would refuse.
    fn crd(crd: &Value) -> Vec<String> {
        let mut c = Checker::default();
        c.check_crd(crd);
        c.errors
    }

    fn check_crd(&mut self, crd: &Value) {
        if crd.get("apiVersion") != Some(&json!("apiextensions.k8s.io/v1")) {
            self.error("apiVersion", "must be apiextensions.k8s.io/v1");
        }
        if crd.get("kind") != Some(&json!("CustomResourceDefinition")) {
            self.error("kind", "must be CustomResourceDefinition");
        }
        // Strict decoding: a key the v1 types do not know is an error with
        // `kubectl apply` (field validation Strict), and would be dropped
        // otherwise.
        match serde_json::from_value::<CustomResourceDefinition>(crd.clone()) {
            Err(e) => self.error("<root>", format!("does not decode as a v1 CRD: {e}")),
            Ok(decoded) => {
                let back = serde_json::to_value(&decoded).expect("CRD serializes");
                let mut lost = Vec::new();
                dropped_fields(crd, &back, "", &mut lost);
                for path in lost {
                    self.error(&path, "unknown field (not part of the v1 API)");
                }
            }
        }

        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default();
        let names = &spec["names"];
        let plural = names["plural"].as_str().unwrap_or_default();
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        if name != format!("{plural}.{group}") {
            self.error(
                "metadata.name",
                format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
            );
        }
        if !is_dns1123_subdomain(group) || !group.contains('.') {
            self.error("spec.group", "should be a domain with at least one dot");
        }
        if !matches!(spec["scope"].as_str(), Some("Namespaced" | "Cluster")) {
            self.error("spec.scope", "must be Namespaced or Cluster");
        }
        if !is_dns1035_label(plural) {
            self.error("spec.names.plural", "must be a DNS-1035 label");
        }
        if let Some(s) = names["singular"].as_str()
            && !is_dns1035_label(s)
        {
            self.error("spec.names.singular", "must be a DNS-1035 label");
        }
        let kind = names["kind"].as_str().unwrap_or_default();
        if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
            self.error("spec.names.kind", "must be a CamelCase name");
        }
        for key in ["shortNames", "categories"] {
            for (i, v) in names[key].as_array().into_iter().flatten().enumerate() {
                if !v.as_str().is_some_and(is_dns1035_label) {
                    self.error(
                        &format!("spec.names.{key}[{i}]"),
                        "must be a DNS-1035 label",
                    );
                }
            }
        }
        if spec.get("preserveUnknownFields") == Some(&json!(true)) {
            self.error(
                "spec.preserveUnknownFields",
                "must be false (structural schemas only)",
            );
        }

        let versions = spec["versions"].as_array().cloned().unwrap_or_default();
        if versions.is_empty() {
            self.error("spec.versions", "must have at least one version");
        }
        let storage = versions
            .iter()
            .filter(|v| v["storage"] == json!(true))
            .count();
        if storage != 1 {
            self.error(
                "spec.versions",
                "exactly one version must be the storage version",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, version) in versions.iter().enumerate() {
            let path = format!("spec.versions[{i}]");
            let vname = version["name"].as_str().unwrap_or_default();
            if !is_dns1035_label(vname) || !seen.insert(vname.to_string()) {
                self.error(&format!("{path}.name"), "must be a unique DNS-1035 label");
            }
            self.check_version(version, &path);
        }
    }

    fn check_version(&mut self, version: &Value, path: &str) {
        for (i, col) in version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let p = format!("{path}.additionalPrinterColumns[{i}]");
            if col["name"].as_str().is_none_or(str::is_empty) {
                self.error(&format!("{p}.name"), "Required value");
            }
            if !col["type"]
                .as_str()
                .is_some_and(|t| PRINTER_TYPES.contains(&t))
            {
                self.error(
                    &format!("{p}.type"),
                    format!("must be one of {PRINTER_TYPES:?}"),
                );
            }
            if let Some(f) = col["format"].as_str()
                && !PRINTER_FORMATS.contains(&f)
            {
                self.error(
                    &format!("{p}.format"),
                    format!("must be one of {PRINTER_FORMATS:?}"),
                );
            }
            if !col["jsonPath"].as_str().is_some_and(|j| j.starts_with('.')) {
                self.error(
                    &format!("{p}.jsonPath"),
                    "must be a simple json path starting with .",
                );
            }
        }
        let sub = &version["subresources"];
        let status_enabled = sub.get("status").is_some();
        if let Some(scale) = sub.get("scale") {
            let p = format!("{path}.subresources.scale");
            for (key, prefixes) in [
                ("specReplicasPath", &[".spec."][..]),
                ("statusReplicasPath", &[".status."][..]),
                ("labelSelectorPath", &[".spec.", ".status."][..]),
            ] {
                match scale.get(key).and_then(Value::as_str) {
                    None if key == "labelSelectorPath" => {}
                    None => self.error(&format!("{p}.{key}"), "Required value"),
                    Some(j) if !prefixes.iter().any(|pre| j.starts_with(pre)) => self.error(
                        &format!("{p}.{key}"),
                        format!("should be a json path under {prefixes:?}"),
                    ),
                    Some(_) => {}
                }
            }
        }

        let Some(schema) = version.pointer("/schema/openAPIV3Schema") else {
            self.error(&format!("{path}.schema.openAPIV3Schema"), "Required value");
            return;
        };
        let root = format!("{path}.schema.openAPIV3Schema");
        if status_enabled && let Some(obj) = schema.as_object() {
            for key in obj.keys() {
                if !ROOT_KEYS_WITH_STATUS.contains(&key.as_str()) {
                    self.error(
                        &root,
                        format!(
                            "{key}: only {ROOT_KEYS_WITH_STATUS:?} are allowed at the root of \
                             the schema if the status subresource is enabled"
                        ),
                    );
                }
            }
        }
        if schema.get("nullable") == Some(&json!(true)) {
            self.error(
                &format!("{root}.nullable"),
                "Forbidden: nullable cannot be true at the root",
            );
        }
        self.total_cost = 0;
        let ctx = Ctx {
            path: root.clone(),
            level: Level::Root,
            resource_root: true,
            inside_meta: false,
            no_defaults: None,
            uncorrelatable: None,
            cardinality: 1,
        };
        self.check_node(schema, &ctx);
        if self.total_cost > CRD_COST_LIMIT {
            self.error(
                &root,
                format!(
                    "Forbidden: x-kubernetes-validations estimated rule cost total for entire \
                     OpenAPIv3 schema ({}) exceeds budget {CRD_COST_LIMIT}",
                    self.total_cost
                ),
            );
        }
    }

    /// One node of the structural part of a schema, and everything under it.
    fn check_node(&mut self, node: &Value, ctx: &Ctx) {
        let path = ctx.path.as_str();
        let Some(obj) = node.as_object() else {
            self.error(path, "must be a schema object");
            return;
        };
        for key in obj.keys() {
            if !SCHEMA_KEYS.contains(&key.as_str()) {
                self.error(&format!("{path}.{key}"), "unknown field in a schema");
            }
        }
        self.check_forbidden_keywords(obj, path);

        let ty = type_of(node);
        let int_or_string = flag(node, "x-kubernetes-int-or-string");
        let preserve = flag(node, "x-kubernetes-preserve-unknown-fields");
        let embedded = flag(node, "x-kubernetes-embedded-resource");
        if !ty.is_empty() && !OPENAPI_TYPES.contains(&ty) {
            self.error(
                &format!("{path}.type"),
                format!("Unsupported value: {ty:?}"),
            );
        }
        if embedded && ty != "object" {
            self.error(
                &format!("{path}.type"),
                "must be object if x-kubernetes-embedded-resource is true",
            );
        } else if ty.is_empty() && !int_or_string && !preserve {
            let what = match ctx.level {
                Level::Root => "must not be empty at the root",
                Level::Item => "must not be empty for specified array items",
                Level::Field => "must not be empty for specified object fields",
            };
            self.error(&format!("{path}.type"), format!("Required value: {what}"));
        }
        if ctx.level == Level::Root && !ty.is_empty() && ty != "object" {
            self.error(&format!("{path}.type"), "must be object at the root");
        }
        if let Some(v) = obj.get("x-kubernetes-preserve-unknown-fields")
            && v != &json!(true)
        {
            self.error(
                &format!("{path}.x-kubernetes-preserve-unknown-fields"),
                "must be true or undefined",
            );
        }
        if int_or_string && preserve {
            self.error(
                &format!("{path}.x-kubernetes-preserve-unknown-fields"),
                "must be false if x-kubernetes-int-or-string is true",
            );
        }
        if int_or_string && embedded {
            self.error(
                &format!("{path}.x-kubernetes-embedded-resource"),
                "must be false if x-kubernetes-int-or-string is true",
            );
        }
        if embedded && ctx.inside_meta {
            self.error(
                &format!("{path}.x-kubernetes-embedded-resource"),
                "must not be used inside of resource meta",
            );
        }
        if embedded && !preserve && props(node).is_none_or(Map::is_empty) {
            self.error(
                &format!("{path}.properties"),
                "must not be empty if x-kubernetes-embedded-resource is true without \
                 x-kubernetes-preserve-unknown-fields",
            );
        }
        if ty == "array" && obj.get("items").is_none() {
            self.error(
                &format!("{path}.items"),
                "Required value: must be specified",
            );
        }
        if let Some(items) = obj.get("items")
            && !items.is_object()
        {
            self.error(
                &format!("{path}.items"),
                "items must be a schema object and not an array",
            );
        }

        // additionalProperties
        if let Some(ap) = obj.get("additionalProperties") {
            if ctx.level == Level::Root {
                self.error(
                    &format!("{path}.additionalProperties"),
                    "Forbidden: must not be used at the root",
                );
            }
            if props(node).is_some_and(|p| !p.is_empty()) {
                self.error(
                    &format!("{path}.additionalProperties"),
                    "Forbidden: additionalProperties and properties are mutual exclusive",
                );
            }
            if embedded {
                self.error(
                    &format!("{path}.additionalProperties"),
                    "must not be used if x-kubernetes-embedded-resource is set",
                );
            }
            match ap {
                Value::Bool(true) => {}
                Value::Object(_) => {
                    let mut sub = ctx.child("additionalProperties", Level::Field);
                    if ctx.inside_meta {
                        sub.no_defaults =
                            Some("inside additionalProperties applying to object metadata".into());
                    }
                    let n = obj
                        .get("maxProperties")
                        .and_then(Value::as_u64)
                        .unwrap_or_else(|| (MAX_REQUEST_BYTES - 2) / (min_json_size(ap) + 6));
                    sub.cardinality = ctx.cardinality.saturating_mul(n.max(1));
                    self.check_node(ap, &sub);
                }
                _ => self.error(
                    &format!("{path}.additionalProperties"),
                    "must be a schema (or true)",
                ),
            }
        }

        // apiVersion, kind, metadata of a resource
        let check_meta = ctx.level == Level::Root || embedded;
        if check_meta {
            for key in ["apiVersion", "kind"] {
                if let Some(p) = props(node).and_then(|p| p.get(key))
                    && type_of(p) != "string"
                {
                    self.error(&format!("{path}.properties[{key}].type"), "must be string");
                }
            }
        }
        if let Some(meta) = props(node).and_then(|p| p.get("metadata")) {
            let mpath = format!("{path}.properties[metadata]");
            if check_meta && type_of(meta) != "object" {
                self.error(&format!("{mpath}.type"), "must be object");
            }
            if ctx.level == Level::Root {
                let rest: Vec<&String> = meta
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.keys())
                    .filter(|k| *k != "type" && *k != "properties")
                    .collect();
                let other_props: Vec<&String> = props(meta)
                    .into_iter()
                    .flat_map(|p| p.keys())
                    .filter(|k| *k != "name" && *k != "generateName")
                    .collect();
                if !rest.is_empty() || !other_props.is_empty() {
                    self.error(
                        &mpath,
                        "Forbidden: must not specify anything other than name and generateName, \
                         but metadata is implicitly specified",
                    );
                }
            }
        }

        // Vendor extensions on lists and maps.
        self.check_list_and_map_types(node, path);

        // Value validations: allOf, anyOf, oneOf, not.
        let skip_any_of = is_int_or_string_any_of(node.get("anyOf"));
        let skip_first_all_of_any_of = node
            .get("allOf")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .is_some_and(|f| is_int_or_string_any_of(f.get("anyOf")));
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let Some(list) = list.as_array() else {
                    self.error(&format!("{path}.{key}"), "must be a list of schemas");
                    continue;
                };
                for (i, nested) in list.iter().enumerate() {
                    let skip = (key == "anyOf" && skip_any_of)
                        || (key == "allOf" && i == 0 && skip_first_all_of_any_of);
                    let npath = format!("{path}.{key}[{i}]");
                    self.check_nested(nested, &npath, skip, key == "anyOf" && skip_any_of);
                    self.check_complete(node, nested, &npath);
                }
            }
        }
        if let Some(not) = obj.get("not") {
            let npath = format!("{path}.not");
            self.check_nested(not, &npath, false, false);
            self.check_complete(node, not, &npath);
        }

        if let Some(pattern) = obj.get("pattern") {
            match pattern.as_str() {
                Some(p) => {
                    if let Err(e) = regex_lite::Regex::new(p) {
                        self.error(
                            &format!("{path}.pattern"),
                            format!("must be a valid regular expression, but isn't: {e}"),
                        );
                    }
                }
                None => self.error(&format!("{path}.pattern"), "must be a string"),
            }
        }

        // Defaults, enum values and examples must be valid values.
        if let Some(default) = obj.get("default") {
            let dpath = format!("{path}.default");
            if let Some(why) = &ctx.no_defaults {
                self.error(&dpath, format!("Forbidden: must not be set {why}"));
            }
            let mut errs = Vec::new();
            check_value(node, default, &dpath, true, &mut errs);
            self.errors.extend(errs);
            // Defaults must also pass the rules at this node and below.
            if let Err(e) = kube_cel::Validator::new().validate(node, default, None) {
                for e in e.as_slice() {
                    self.error(
                        &dpath,
                        format!("Invalid value: fails rule {:?}: {}", e.rule, e.message),
                    );
                }
            }
        }
        for (i, v) in obj
            .get("enum")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mut errs = Vec::new();
            let mut no_enum = node.clone();
            no_enum.as_object_mut().unwrap().remove("enum");
            check_value(&no_enum, v, &format!("{path}.enum[{i}]"), false, &mut errs);
            self.errors.extend(errs);
        }
        if let Some(example) = obj.get("example") {
            let mut errs = Vec::new();
            check_value(node, example, &format!("{path}.example"), false, &mut errs);
            self.errors.extend(errs);
        }

        self.check_rules(node, ctx);

        // Children.
        if let Some(p) = props(node) {
            for (name, child) in p {
                let mut sub = ctx.child(&format!("properties[{name}]"), Level::Field);
                if (ctx.level == Level::Root || embedded)
                    && matches!(name.as_str(), "metadata" | "kind" | "apiVersion")
                {
                    sub.inside_meta = true;
                    if ctx.level == Level::Root {
                        sub.no_defaults = Some(format!("in top-level {name}"));
                    }
                }
                sub.resource_root = flag(child, "x-kubernetes-embedded-resource");
                self.check_node(child, &sub);
            }
        }
        if let Some(items) = obj.get("items").filter(|i| i.is_object()) {
            let mut sub = ctx.child("items", Level::Item);
            if obj.get("x-kubernetes-list-type") != Some(&json!("map"))
                && sub.uncorrelatable.is_none()
            {
                sub.uncorrelatable = Some(path.to_string());
            }
            let n = obj
                .get("maxItems")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| (MAX_REQUEST_BYTES - 2) / (min_json_size(items) + 1));
            sub.cardinality = ctx.cardinality.saturating_mul(n.max(1));
            sub.resource_root = flag(items, "x-kubernetes-embedded-resource");
            self.check_node(items, &sub);
        }
    }

    fn check_forbidden_keywords(&mut self, obj: &Map<String, Value>, path: &str) {
        for (key, what) in [
            ("$ref", "$ref is not supported"),
            ("definitions", "definitions is not supported"),
            ("dependencies", "dependencies is not supported"),
            ("patternProperties", "patternProperties is not supported"),
            ("additionalItems", "additionalItems is not supported"),
            ("id", "id is not supported"),
        ] {
            if obj.contains_key(key) {
                self.error(&format!("{path}.{key}"), format!("Forbidden: {what}"));
            }
        }
        if obj.get("uniqueItems") == Some(&json!(true)) {
            self.error(
                &format!("{path}.uniqueItems"),
                "Forbidden: uniqueItems cannot be set to true since the runtime complexity \
                 becomes quadratic",
            );
        }
        if obj.get("type") == Some(&json!("null")) {
            self.error(
                &format!("{path}.type"),
                "Forbidden: type cannot be set to null, use nullable as an alternative",
            );
        }
    }

    fn check_list_and_map_types(&mut self, node: &Value, path: &str) {
        let ty = type_of(node);
        if let Some(mt) = node.get("x-kubernetes-map-type") {
            if ty != "object" {
                self.error(
                    &format!("{path}.type"),
                    "must be object if x-kubernetes-map-type is specified",
                );
            }
            if !matches!(mt.as_str(), Some("atomic" | "granular")) {
                self.error(
                    &format!("{path}.x-kubernetes-map-type"),
                    "Unsupported value: want atomic or granular",
                );
            }
        }
        let list_type = node
            .get("x-kubernetes-list-type")
            .map(|v| v.as_str().unwrap_or("?"));
        if let Some(lt) = list_type {
            if ty != "array" {
                self.error(
                    &format!("{path}.type"),
                    "must be array if x-kubernetes-list-type is specified",
                );
            }
            if !matches!(lt, "atomic" | "set" | "map") {
                self.error(
                    &format!("{path}.x-kubernetes-list-type"),
                    "Unsupported value: want atomic, set or map",
                );
            }
        }
        let keys: Vec<&str> = node
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !keys.is_empty() && list_type != Some("map") {
            self.error(
                &format!("{path}.x-kubernetes-list-type"),
                "must be map if x-kubernetes-list-map-keys is non-empty",
            );
        }
        let items = node.get("items").filter(|i| i.is_object());
        if matches!(list_type, Some("set" | "map"))
            && let Some(items) = items
            && flag(items, "nullable")
        {
            self.error(
                &format!("{path}.items.nullable"),
                format!(
                    "Forbidden: cannot be nullable when x-kubernetes-list-type is {}",
                    list_type.unwrap()
                ),
            );
        }
        if list_type == Some("set")
            && let Some(items) = items
        {
            match type_of(items) {
                "object" if items.get("x-kubernetes-map-type") != Some(&json!("atomic")) => self
                    .error(
                        &format!("{path}.items.x-kubernetes-map-type"),
                        "must be atomic as item of a list with x-kubernetes-list-type=set",
                    ),
                "array"
                    if items
                        .get("x-kubernetes-list-type")
                        .is_some_and(|t| t != &json!("atomic")) =>
                {
                    self.error(
                        &format!("{path}.items.x-kubernetes-list-type"),
                        "must be atomic as item of a list with x-kubernetes-list-type=set",
                    )
                }
                _ => {}
            }
        }
        if list_type == Some("map") {
            if keys.is_empty() {
                self.error(
                    &format!("{path}.x-kubernetes-list-map-keys"),
                    "Required value: must not be empty if x-kubernetes-list-type is map",
                );
            }
            let Some(items) = items else {
                self.error(
                    &format!("{path}.items"),
                    "must have a schema if x-kubernetes-list-type is map",
                );
                return;
            };
            if type_of(items) != "object" {
                self.error(
                    &format!("{path}.items.type"),
                    "must be object if parent array's x-kubernetes-list-type is map",
                );
                return;
            }
            let required: Vec<&str> = items
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut seen = BTreeSet::new();
            for k in &keys {
                if !seen.insert(*k) {
                    self.error(
                        &format!("{path}.x-kubernetes-list-map-keys"),
                        "must not contain duplicate entries",
                    );
                }
                match props(items).and_then(|p| p.get(*k)) {
                    None => self.error(
                        &format!("{path}.x-kubernetes-list-map-keys"),
                        "entries must all be names of item properties",
                    ),
                    Some(p) => {
                        if matches!(type_of(p), "array" | "object") {
                            self.error(
                                &format!("{path}.items.properties[{k}].type"),
                                "must be a scalar type if parent array's x-kubernetes-list-type is map",
                            );
                        }
                        if !required.contains(k) && p.get("default").is_none() {
                            self.error(
                                &format!("{path}.items.properties[{k}].default"),
                                "this property is in x-kubernetes-list-map-keys, so it must have a \
                                 default or be a required property",
                            );
                        }
                        if flag(p, "nullable") {
                            self.error(
                                &format!("{path}.items.properties[{k}].nullable"),
                                "this property is in x-kubernetes-list-map-keys, so it cannot be nullable",
                            );
                        }
                    }
                }
            }
        }
    }

    /// A schema under `allOf`/`anyOf`/`oneOf`/`not` (`validateNestedValueValidation`).
    fn check_nested(
        &mut self,
        v: &Value,
        path: &str,
        skip_any_of: bool,
        int_or_string_branch: bool,
    ) {
        let Some(obj) = v.as_object() else {
            self.error(path, "must be a schema object");
            return;
        };
        for key in obj.keys() {
            if !SCHEMA_KEYS.contains(&key.as_str()) {
                self.error(&format!("{path}.{key}"), "unknown field in a schema");
            }
        }
        self.check_forbidden_keywords(obj, path);
        if obj.contains_key("type") && !int_or_string_branch {
            self.error(
                &format!("{path}.type"),
                "Forbidden: must be empty to be structural",
            );
        }
        for (key, what) in [
            ("additionalProperties", "must be undefined to be structural"),
            ("default", "must be undefined to be structural"),
            ("title", "must be empty to be structural"),
            ("description", "must be empty to be structural"),
            (
                "x-kubernetes-list-map-keys",
                "must be empty to be structural",
            ),
            (
                "x-kubernetes-list-type",
                "must be undefined to be structural",
            ),
            (
                "x-kubernetes-map-type",
                "must be undefined to be structural",
            ),
            ("x-kubernetes-validations", "must be empty to be structural"),
        ] {
            if obj.contains_key(key) {
                self.error(&format!("{path}.{key}"), format!("Forbidden: {what}"));
            }
        }
        for key in [
            "nullable",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-embedded-resource",
            "x-kubernetes-int-or-string",
        ] {
            if flag(v, key) {
                self.error(
                    &format!("{path}.{key}"),
                    "Forbidden: must be false to be structural",
                );
            }
        }
        if props(v).is_some_and(|p| p.contains_key("metadata")) {
            self.error(
                &format!("{path}.properties[metadata]"),
                "Forbidden: must not be specified in a nested context",
            );
        }
        for (name, child) in props(v).into_iter().flatten() {
            self.check_nested(child, &format!("{path}.properties[{name}]"), false, false);
        }
        if let Some(items) = obj.get("items") {
            self.check_nested(items, &format!("{path}.items"), false, false);
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if key == "anyOf" && skip_any_of {
                for (i, b) in obj
                    .get(key)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    self.check_nested(b, &format!("{path}.{key}[{i}]"), false, true);
                }
                continue;
            }
            for (i, b) in obj
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                self.check_nested(b, &format!("{path}.{key}[{i}]"), false, false);
            }
        }
        if let Some(not) = obj.get("not") {
            self.check_nested(not, &format!("{path}.not"), false, false);
        }
    }

    /// Every field or list a value validation talks about is specified by the
    /// structural part (`validateStructuralCompleteness`).
    fn check_complete(&mut self, structural: &Value, nested: &Value, path: &str) {
        for (name, child) in props(nested).into_iter().flatten() {
            match props(structural).and_then(|p| p.get(name)) {
                Some(s) => self.check_complete(s, child, &format!("{path}.properties[{name}]")),
                None => self.error(
                    &format!("{path}.properties[{name}]"),
                    "Required value: because it is defined in a value validation, it must be \
                     specified in the structural part of the schema",
                ),
            }
        }
        if let Some(items) = nested.get("items") {
            match structural.get("items") {
                Some(s) => self.check_complete(s, items, &format!("{path}.items")),
                None => self.error(
                    &format!("{path}.items"),
                    "Required value: because it is defined in a value validation, it must be \
                     specified in the structural part of the schema",
                ),
            }
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            for (i, b) in nested
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                self.check_complete(structural, b, &format!("{path}.{key}[{i}]"));
            }
        }
        if let Some(not) = nested.get("not") {
            self.check_complete(structural, not, &format!("{path}.not"));
        }
    }

    /// The `x-kubernetes-validations` of one node.
    fn check_rules(&mut self, node: &Value, ctx: &Ctx) {
        let Some(rules) = node.get("x-kubernetes-validations") else {
            return;
        };
        let path = format!("{}.x-kubernetes-validations", ctx.path);
        let Some(rules) = rules.as_array() else {
            self.error(&path, "must be a list of rules");
            return;
        };
        let compiled = kube_cel::compile_schema(node);
        // What `self` is in this node's rules: the API server's CEL type of
        // the node; at a resource root it adds apiVersion, kind and
        // metadata.name/generateName (and nothing else of metadata).
        let self_schema = if ctx.resource_root {
            with_type_and_object_meta(node)
        } else {
            node.clone()
        };
        for (i, rule) in rules.iter().enumerate() {
            let rpath = format!("{path}[{i}]");
            let Some(r) = rule.as_object() else {
                self.error(&rpath, "must be an object");
                continue;
            };
            for key in r.keys() {
                if !RULE_KEYS.contains(&key.as_str()) {
                    self.error(
                        &format!("{rpath}.{key}"),
                        "unknown field in a validation rule",
                    );
                }
            }
            let text = |k: &str| r.get(k).and_then(Value::as_str);
            let expr = text("rule").unwrap_or_default();
            let message = text("message").unwrap_or_default();
            let message_expression = text("messageExpression");
            if expr.trim().is_empty() {
                self.error(
                    &format!("{rpath}.rule"),
                    "Required value: rule is not specified",
                );
            } else if !message.is_empty() && message.trim().is_empty() {
                self.error(
                    &format!("{rpath}.message"),
                    "message must be non-empty if specified",
                );
            } else if message.len() > 2048 {
                self.error(
                    &format!("{rpath}.message"),
                    "message must have a maximum length of 2048 characters",
                );
            } else if has_newlines(message.trim()) {
                self.error(
                    &format!("{rpath}.message"),
                    "message must not contain line breaks",
                );
            } else if has_newlines(expr.trim()) && message.trim().is_empty() {
                self.error(
                    &format!("{rpath}.message"),
                    "Required value: message must be specified if rule contains line breaks",
                );
            }
            if message_expression.is_some_and(|m| m.trim().is_empty()) {
                self.error(
                    &format!("{rpath}.messageExpression"),
                    "Required value: messageExpression must be non-empty if specified",
                );
            }
            if let Some(reason) = r.get("reason")
                && !reason.as_str().is_some_and(|x| REASONS.contains(&x))
            {
                self.error(
                    &format!("{rpath}.reason"),
                    format!("Unsupported value: {reason}: supported values: {REASONS:?}"),
                );
            }
            if let Some(fp) = r.get("fieldPath") {
                let fp = fp.as_str().unwrap_or_default();
                let fpath = format!("{rpath}.fieldPath");
                if fp.trim().is_empty() {
                    self.error(
                        &fpath,
                        format!("Invalid value: {fp:?}: fieldPath must be non-empty if specified"),
                    );
                } else if has_newlines(fp) {
                    self.error(
                        &fpath,
                        format!("Invalid value: {fp:?}: fieldPath must not contain line breaks"),
                    );
                } else if let Err(e) = valid_field_path(fp, node) {
                    self.error(
                        &fpath,
                        format!("Invalid value: {fp:?}: fieldPath must be a valid path: {e}"),
                    );
                }
            }

            // CEL: compile, then names and cost.
            let compiled_rule = match compiled.validations.get(i) {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    self.error(
                        &format!("{rpath}.rule"),
                        format!("Invalid value: compilation failed: {e}"),
                    );
                    continue;
                }
                None => continue,
            };
            let optional_old_self = r.get("optionalOldSelf") == Some(&json!(true));
            if compiled_rule.is_transition_rule {
                if let Some(list) = &ctx.uncorrelatable {
                    self.error(
                        &format!("{rpath}.rule"),
                        format!(
                            "Invalid value: {expr:?}: oldSelf cannot be used on the uncorrelatable \
                             portion of the schema within {list}"
                        ),
                    );
                }
            } else if r.contains_key("optionalOldSelf") {
                self.error(
                    &format!("{rpath}.optionalOldSelf"),
                    "Invalid value: may not be set if oldSelf is not used in rule",
                );
            }
            let old_self = if optional_old_self {
                Ty::Dyn
            } else {
                Ty::Schema(self_schema.clone())
            };
            let mut expressions = vec![("rule", compiled_rule.program.expression())];
            if let Some(m) = &compiled_rule.message_program {
                expressions.push(("messageExpression", m.expression()));
            }
            for (what, e) in expressions {
                let mut walk = CelWalk {
                    errors: Vec::new(),
                    scope: vec![
                        ("self".into(), Ty::Schema(self_schema.clone())),
                        ("oldSelf".into(), old_self.clone()),
                    ],
                };
                let (_, cost) = walk.expr(&e.expr);
                for err in walk.errors {
                    self.error(
                        &format!("{rpath}.{what}"),
                        format!("Invalid value: compilation failed: {err}"),
                    );
                }
                let total = cost.saturating_mul(ctx.cardinality);
                if std::env::var_os("CRD_COST_DEBUG").is_some() {
                    eprintln!(
                        "{rpath}.{what}: cost {cost} x {} = {total}",
                        ctx.cardinality
                    );
                }
                self.total_cost = self.total_cost.saturating_add(total);
                if total > RULE_COST_LIMIT {
                    self.error(
                        &format!("{rpath}.{what}"),
                        format!(
                            "Forbidden: estimated {what} cost {total} ({cost} per evaluation, up to \
                             {} evaluations) exceeds budget {RULE_COST_LIMIT} (add maxItems, \
                             maxProperties or maxLength)",
                            ctx.cardinality
                        ),
                    );
                }
            }
            for w in kube_cel::analyze_rule(expr, &compiled, ScopeContext::CrdValidation) {
                if w.kind == WarningKind::CostExceeded {
                    self.error(
                        &format!("{rpath}.rule"),
                        format!("Forbidden: {}", w.message),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// fieldPath, as `cel.ValidFieldPath` resolves it

/// Resolves `path` against `schema` (the schema of the node the rule is on).
/// The same tokens and errors as the API server: `.name` and `['name']`
/// select a property (or, on a map, a key), nothing indexes into a list.
fn valid_field_path<'a>(path: &str, mut schema: &'a Value) -> Result<&'a Value, String> {
    static ANY: Value = Value::Null;
    let tokens = field_path_tokens(path);
    let mut tokens = tokens.iter().map(String::as_str);
    let step = |schema: &'a Value, name: &str| -> Result<&'a Value, String> {
        if let Some(p) = schema.get("properties").and_then(Value::as_object) {
            p.get(name)
                .ok_or_else(|| "does not refer to a valid field".to_string())
        } else if let Some(ap) = schema.get("additionalProperties") {
            Ok(if ap.is_object() { ap } else { &ANY })
        } else {
            Err("does not refer to a valid field".into())
        }
    };
    while let Some(tok) = tokens.next() {
        match tok {
            "[" => {
                let quoted = tokens.next().ok_or("unexpected end of JSON path")?;
                if quoted.len() < 2 || !quoted.starts_with('\'') || !quoted.ends_with('\'') {
                    return Err(format!("expected single quoted string but got {quoted}"));
                }
                let name = unescape_single_quote(&quoted[1..quoted.len() - 1])
                    .map_err(|e| format!("invalid string literal: {e}"))?;
                schema = step(schema, &name)?;
                match tokens.next() {
                    Some("]") => {}
                    Some(t) => return Err(format!("expected ] but got {t}")),
                    None => return Err("unexpected end of JSON path".into()),
                }
            }
            "." => {
                let name = tokens.next().ok_or("unexpected end of JSON path")?;
                schema = step(schema, name)?;
            }
            other => return Err(format!("expected [ or . but got: {other}")),
        }
    }
    Ok(schema)
}

/// The API server's scanner: `.`, `[` and `]` are tokens of their own; text
/// in single quotes (up to an unescaped quote) is one token; so is the text
/// between delimiters.
fn field_path_tokens(path: &str) -> Vec<String> {
    let b = path.as_bytes();
    let mut tokens = Vec::new();
    let mut start = 0;
    while start < b.len() {
        let rest = &b[start..];
        let len = if rest[0] == b'\'' {
            (1..rest.len())
                .find(|&i| rest[i] == b'\'' && rest[i - 1] != b'\\')
                .map_or(rest.len(), |i| i + 1)
        } else {
            match rest.iter().position(|c| matches!(c, b'.' | b'[' | b']')) {
                Some(0) => 1,
                Some(i) => i,
                None => rest.len(),
            }
        };
        tokens.push(String::from_utf8_lossy(&rest[..len]).into_owned());
        start += len;
    }
    tokens
}

fn unescape_single_quote(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('a') => out.push('\u{7}'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('v') => out.push('\u{b}'),
            Some('\'') => out.push('\''),
            Some('\\') => out.push('\\'),
            Some(other) => return Err(format!("invalid escape char \\{other}")),
            None => out.push('\\'),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// CEL: names and cost

/// What an expression is known to be: a value of a schema, or anything.
#[derive(Clone, Debug)]
enum Ty {
    Schema(Value),
    StrLit(u64),
    /// A number, boolean or null.
    Scalar,
    Dyn,
}

struct CelWalk {
    errors: Vec<String>,
    /// Variables in scope, innermost last.
    scope: Vec<(String, Ty)>,
}

impl CelWalk {
    /// The type of `e` (as far as it matters for field names) and its
    /// estimated cost, after cel-go's cost model.
    fn expr(&mut self, e: &Expr) -> (Ty, u64) {
        match e {
            Expr::Literal(LiteralValue::String(s)) => (Ty::StrLit(s.len() as u64), 0),
            Expr::Literal(_) => (Ty::Scalar, 0),
            Expr::Ident(name) => {
                if let Some((_, t)) = self.scope.iter().rev().find(|(n, _)| n == name) {
                    (t.clone(), 1)
                } else {
                    if !CEL_GLOBALS.contains(&name.as_str()) {
                        self.errors
                            .push(format!("undeclared reference to '{name}'"));
                    }
                    (Ty::Dyn, 1)
                }
            }
            Expr::Select(sel) => {
                let (t, c) = self.expr(&sel.operand.expr);
                (self.select(&t, &sel.field), c + 1)
            }
            Expr::Call(call) => self.call(
                &call.func_name,
                call.target.as_deref().map(|t| &t.expr),
                &call.args,
            ),
            Expr::Comprehension(comp) => {
                let (range, range_cost) = self.expr(&comp.iter_range.expr);
                let (_, init_cost) = self.expr(&comp.accu_init.expr);
                let (elem, n) = match &range {
                    Ty::Schema(s) if type_of(s) == "array" => (
                        s.get("items").cloned().map_or(Ty::Dyn, Ty::Schema),
                        max_elements(s),
                    ),
                    Ty::Schema(s) if type_of(s) == "object" => (Ty::Dyn, max_elements(s)),
                    _ => (Ty::Dyn, MAX_REQUEST_BYTES),
                };
                let depth = self.scope.len();
                match &comp.iter_var2 {
                    // Two-variable form: index/key and value.
                    Some(v2) => {
                        self.scope.push((comp.iter_var.clone(), Ty::Dyn));
                        self.scope.push((v2.clone(), elem));
                    }
                    None => self.scope.push((comp.iter_var.clone(), elem)),
                }
                self.scope.push((comp.accu_var.clone(), Ty::Dyn));
                let (_, cond) = self.expr(&comp.loop_cond.expr);
                let (_, step) = self.expr(&comp.loop_step.expr);
                let (_, result) = self.expr(&comp.result.expr);
                self.scope.truncate(depth);
                (
                    Ty::Dyn,
                    range_cost + init_cost + n.saturating_mul(cond + step) + result,
                )
            }
            Expr::List(list) => {
                let c: u64 = list.elements.iter().map(|x| self.expr(&x.expr).1).sum();
                (Ty::Dyn, 10 + c)
            }
            Expr::Map(map) => {
                let mut c = 30;
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(m) = &entry.expr {
                        c += self.expr(&m.key.expr).1 + self.expr(&m.value.expr).1;
                    }
                }
                (Ty::Dyn, c)
            }
            Expr::Struct(s) => {
                let mut c = 40;
                for entry in &s.entries {
                    if let EntryExpr::StructField(f) = &entry.expr {
                        c += self.expr(&f.value.expr).1;
                    }
                }
                (Ty::Dyn, c)
            }
            Expr::Unspecified => (Ty::Dyn, 0),
        }
    }

    /// `t.field`: the field must be declared (or `t` must be a map).
    fn select(&mut self, t: &Ty, field: &str) -> Ty {
        let Ty::Schema(s) = t else {
            return Ty::Dyn;
        };
        if flag(s, "x-kubernetes-int-or-string") {
            return Ty::Dyn;
        }
        match type_of(s) {
            "object" => {
                if let Some((_, child)) = props(s)
                    .into_iter()
                    .flatten()
                    .find(|(name, _)| cel_escape(name).as_deref() == Some(field))
                {
                    if !exposed_to_cel(child) {
                        self.errors.push(format!(
                            "undefined field '{field}' (a field without a type is not visible to CEL)"
                        ));
                        return Ty::Dyn;
                    }
                    let child = if flag(child, "x-kubernetes-embedded-resource") {
                        with_type_and_object_meta(child)
                    } else {
                        child.clone()
                    };
                    return Ty::Schema(child);
                }
                match s.get("additionalProperties") {
                    Some(ap) if ap.is_object() => Ty::Schema(ap.clone()),
                    Some(_) => Ty::Dyn,
                    None => {
                        self.errors.push(format!("undefined field '{field}'"));
                        Ty::Dyn
                    }
                }
            }
            "" => Ty::Dyn,
            other => {
                self.errors.push(format!(
                    "type '{other}' does not support field selection ('{field}')"
                ));
                Ty::Dyn
            }
        }
    }

    fn call(&mut self, name: &str, target: Option<&Expr>, args: &[IdedExpr]) -> (Ty, u64) {
        let (target_ty, target_cost) = match target {
            Some(t) => {
                let (ty, c) = self.expr(t);
                (Some(ty), c)
            }
            None => (None, 0),
        };
        let mut arg_tys = Vec::new();
        let mut cost = target_cost;
        for a in args {
            let (t, c) = self.expr(&a.expr);
            arg_tys.push(t);
            cost += c;
        }
        // The receiver of a string function: the target, or the first
        // argument of the global form.
        let (recv, rest): (Option<&Ty>, &[Ty]) = match &target_ty {
            Some(t) => (Some(t), &arg_tys[..]),
            None => match arg_tys.split_first() {
                Some((first, rest)) => (Some(first), rest),
                None => (None, &[]),
            },
        };
        let recv_len = recv.map_or(0, str_size);
        let arg_len = rest.first().map_or(0, str_size);
        let traversal = |n: u64| n.div_ceil(10); // 0.1 per byte
        let (ty, own) = match name {
            "matches" => (
                Ty::Scalar,
                traversal(recv_len).max(1) * arg_len.div_ceil(4).max(1),
            ),
            "startsWith" | "endsWith" => (Ty::Scalar, 1 + traversal(arg_len)),
            "contains" | "indexOf" | "lastIndexOf" | "split" | "replace" | "find" | "findAll" => {
                (Ty::Dyn, 1 + traversal(recv_len) * traversal(arg_len).max(1))
            }
            "lowerAscii" | "upperAscii" | "trim" | "substring" | "join" | "format" => {
                (Ty::Dyn, 1 + traversal(recv_len))
            }
            "_==_" | "_!=_" => {
                let size = arg_tys.iter().map(byte_size).min().unwrap_or(0);
                (Ty::Scalar, 1 + traversal(size))
            }
            "size" | "_<_" | "_<=_" | "_>_" | "_>=_" | "_&&_" | "_||_" | "!_" | "_-_" | "_*_"
            | "_/_" | "_%_" | "-_" | "int" | "uint" | "double" | "bool" => (Ty::Scalar, 1),
            "_+_" => {
                let size: u64 = arg_tys.iter().map(byte_size).fold(0, u64::saturating_add);
                (Ty::Dyn, 1 + traversal(size))
            }
            "_[_]" | "_[?_]" => {
                let elem = match arg_tys.first() {
                    Some(Ty::Schema(s)) if type_of(s) == "array" => {
                        s.get("items").cloned().map_or(Ty::Dyn, Ty::Schema)
                    }
                    Some(Ty::Schema(s)) if type_of(s) == "object" => {
                        match s.get("additionalProperties") {
                            Some(ap) if ap.is_object() => Ty::Schema(ap.clone()),
                            _ => Ty::Dyn,
                        }
                    }
                    _ => Ty::Dyn,
                };
                (if name == "_[_]" { elem } else { Ty::Dyn }, 1)
            }
            "_?._" => {
                // Optional field selection: `self.?field`.
                if let (Some(t), Some(Expr::Literal(LiteralValue::String(f)))) =
                    (arg_tys.first(), args.get(1).map(|a| &a.expr))
                {
                    let _ = self.select(t, f);
                }
                (Ty::Dyn, 1)
            }
            _ => (Ty::Dyn, 1),
        };
        (ty, cost.saturating_add(own))
    }
}

/// A field is part of the CEL type of its object when it has a type (or is
/// int-or-string); lists and maps when their elements are.
fn exposed_to_cel(s: &Value) -> bool {
    if flag(s, "x-kubernetes-int-or-string") {
        return true;
    }
    match type_of(s) {
        "" => false,
        "array" => s.get("items").is_some_and(exposed_to_cel),
        "object" => match s.get("additionalProperties") {
            Some(ap) if ap.is_object() => exposed_to_cel(ap),
            _ => true,
        },
        _ => true,
    }
}

/// The CEL name of a property (`apiextensions` `Escape`), or `None` if a rule
/// cannot name it.
fn cel_escape(name: &str) -> Option<String> {
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if CEL_RESERVED.contains(&name) {
        return Some(format!("__{name}__"));
    }
    let mut out = String::new();
    let mut rest = name;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("__") {
            out.push_str("__underscores__");
            rest = &rest[2..];
            continue;
        }
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' => out.push(c),
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            _ => return None,
        }
        rest = &rest[c.len_utf8()..];
    }
    Some(out)
}

/// `WithTypeAndObjectMeta`: a resource root as CEL sees it.
fn with_type_and_object_meta(s: &Value) -> Value {
    let mut s = s.clone();
    let obj = s.as_object_mut().expect("schema object");
    let props = obj
        .entry("properties")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("properties");
    props.insert("apiVersion".into(), json!({"type": "string"}));
    props.insert("kind".into(), json!({"type": "string"}));
    props.insert(
        "metadata".into(),
        json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "generateName": {"type": "string"},
        }}),
    );
    s
}

/// Largest size (bytes) of a string value, as the API server estimates it.
fn str_size(t: &Ty) -> u64 {
    match t {
        Ty::StrLit(n) => *n,
        Ty::Scalar => 20,
        Ty::Schema(s) if type_of(s) == "string" => {
            if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
                return max * 4;
            }
            if let Some(e) = s.get("enum").and_then(Value::as_array) {
                return e
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|x| x.len() as u64)
                    .max()
                    .unwrap_or(0);
            }
            match s.get("format").and_then(Value::as_str) {
                Some("date") => 12,
                Some("date-time" | "duration") => 64,
                _ => MAX_REQUEST_BYTES - 2,
            }
        }
        Ty::Schema(s) => byte_size(&Ty::Schema(s.clone())),
        Ty::Dyn => MAX_REQUEST_BYTES - 2,
    }
}

/// Largest serialized size of a value, bounded by the request limit.
fn byte_size(t: &Ty) -> u64 {
    fn size(s: &Value, depth: usize) -> u64 {
        if depth > 32 {
            return MAX_REQUEST_BYTES;
        }
        let n = match type_of(s) {
            "string" => str_size(&Ty::Schema(s.clone())) + 2,
            "integer" | "number" => 20,
            "boolean" => 5,
            "array" => max_elements(s).saturating_mul(
                s.get("items")
                    .map_or(MAX_REQUEST_BYTES, |i| size(i, depth + 1))
                    + 1,
            ),
            "object" => match props(s) {
                Some(p) if !p.is_empty() => p
                    .iter()
                    .map(|(k, v)| k.len() as u64 + 4 + size(v, depth + 1))
                    .fold(2, u64::saturating_add),
                _ => MAX_REQUEST_BYTES,
            },
            _ => MAX_REQUEST_BYTES,
        };
        n.min(MAX_REQUEST_BYTES)
    }
    match t {
        Ty::StrLit(n) => *n,
        Ty::Scalar => 20,
        Ty::Schema(s) => size(s, 0),
        Ty::Dyn => MAX_REQUEST_BYTES,
    }
}

/// Most elements a list or map can have.
fn max_elements(s: &Value) -> u64 {
    if type_of(s) == "array" {
        s.get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| {
                (MAX_REQUEST_BYTES - 2) / (s.get("items").map_or(1, min_json_size) + 1)
            })
    } else {
        s.get("maxProperties")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| {
                (MAX_REQUEST_BYTES - 2)
                    / (s.get("additionalProperties").map_or(1, min_json_size) + 6)
            })
    }
}

/// Smallest serialized size of a value of this schema.
fn min_json_size(s: &Value) -> u64 {
    match type_of(s) {
        "string" => 2 + s.get("minLength").and_then(Value::as_u64).unwrap_or(0),
        "boolean" => 4,
        "integer" | "number" => 1,
        _ => 2,
    }
}

// ---------------------------------------------------------------------------
// Values against a schema (defaults, enum values, examples)

fn check_value(s: &Value, v: &Value, path: &str, pruned: bool, out: &mut Vec<String>) {
    if v.is_null() {
        if !flag(s, "nullable") {
            out.push(format!("{path}: Invalid value: null: must not be null"));
        }
        return;
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        out.push(format!("{path}: Unsupported value: {v}: not in the enum"));
    }
    let ty = type_of(s);
    let type_ok = match ty {
        "" => true,
        "string" => v.is_string() || (flag(s, "x-kubernetes-int-or-string") && v.is_i64()),
        "integer" => {
            v.is_i64() || v.is_u64() || (flag(s, "x-kubernetes-int-or-string") && v.is_string())
        }
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    };
    if !type_ok {
        out.push(format!("{path}: Invalid value: {v}: must be of type {ty}"));
        return;
    }
    match v {
        Value::String(x) => {
            let n = x.chars().count() as u64;
            if s.get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n < m)
            {
                out.push(format!(
                    "{path}: Invalid value: {v}: shorter than minLength"
                ));
            }
            if s.get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
            {
                out.push(format!("{path}: Invalid value: {v}: longer than maxLength"));
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str)
                && let Ok(re) = regex_lite::Regex::new(p)
                && !re.is_match(x)
            {
                out.push(format!("{path}: Invalid value: {v}: does not match {p:?}"));
            }
        }
        Value::Number(x) => {
            let f = x.as_f64().unwrap_or_default();
            if s.get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| f < m)
            {
                out.push(format!("{path}: Invalid value: {v}: less than minimum"));
            }
            if s.get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| f > m)
            {
                out.push(format!("{path}: Invalid value: {v}: greater than maximum"));
            }
            if s.get("format") == Some(&json!("int32"))
                && (f < i32::MIN as f64 || f > i32::MAX as f64)
            {
                out.push(format!("{path}: Invalid value: {v}: out of int32 range"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if s.get("minItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n < m)
            {
                out.push(format!("{path}: Invalid value: fewer than minItems"));
            }
            if s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
            {
                out.push(format!("{path}: Invalid value: more than maxItems"));
            }
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_value(item_schema, item, &format!("{path}[{i}]"), pruned, out);
                }
            }
        }
        Value::Object(fields) => {
            for r in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(r) = r.as_str()
                    && !fields.contains_key(r)
                {
                    out.push(format!("{path}.{r}: Required value"));
                }
            }
            let declared = props(s);
            let ap = s.get("additionalProperties");
            for (k, fv) in fields {
                let fpath = format!("{path}.{k}");
                if let Some(fs) = declared.and_then(|p| p.get(k)) {
                    check_value(fs, fv, &fpath, pruned, out);
                } else if let Some(ap) = ap.filter(|a| a.is_object()) {
                    check_value(ap, fv, &fpath, pruned, out);
                } else if pruned && ap.is_none() && !flag(s, "x-kubernetes-preserve-unknown-fields")
                {
                    out.push(format!(
                        "{fpath}: Invalid value: unknown field (it would be pruned)"
                    ));
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Small helpers

fn type_of(s: &Value) -> &str {
    s.get("type").and_then(Value::as_str).unwrap_or_default()
}

fn flag(s: &Value, key: &str) -> bool {
    s.get(key) == Some(&json!(true))
}

fn props(s: &Value) -> Option<&Map<String, Value>> {
    s.get("properties").and_then(Value::as_object)
}

fn has_newlines(s: &str) -> bool {
    s.contains(['\n', '\r'])
}

fn is_int_or_string_any_of(v: Option<&Value>) -> bool {
    v == Some(&json!([{"type": "integer"}, {"type": "string"}]))
}

fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Keys of `orig` that did not survive decoding into the v1 types.
fn dropped_fields(orig: &Value, decoded: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, decoded) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(w) => dropped_fields(v, w, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                dropped_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn crds_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

// ---------------------------------------------------------------------------
// The CRDs

/// What `kubectl apply -f crds/` sends: every file in `crds/`.
#[test]
fn checked_in_crds_pass_the_api_servers_checks() {
    let mut files: Vec<_> = std::fs::read_dir(crds_dir())
        .expect("crds/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        3,
        "expected the three CRDs in crds/: {files:?}"
    );
    let mut report = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let crd: Value = serde_saphyr::from_str(&text).expect("CRD YAML parses");
        for e in Checker::crd(&crd) {
            report.push(format!(
                "{}: {e}",
                file.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(
        report.is_empty(),
        "the API server would refuse crds/:\n  {}",
        report.join("\n  ")
    );
}

/// The same for what the code generates (independent of `crds/` being in
/// sync, which `crd::tests::checked_in_crds_are_in_sync` checks).
#[test]
fn generated_crds_pass_the_api_servers_checks() {
    for (file, crd) in starling_operator::crd::all() {
        let errors = Checker::crd(&serde_json::to_value(&crd).unwrap());
        assert!(errors.is_empty(), "{file}:\n  {}", errors.join("\n  "));
    }
}

// ---------------------------------------------------------------------------
// The checker itself: each check refuses what the API server refuses.

/// A CRD around `schema` with a status subresource, as ours have.
fn crd_with(schema: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.dev"},
        "spec": {
            "group": "example.dev",
            "names": {"kind": "Thing", "plural": "things", "singular": "thing"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
            }],
        },
    })
}

/// A root schema with a `spec` of these properties and these root rules.
fn root(spec_props: Value, rules: Value) -> Value {
    json!({
        "type": "object",
        "properties": {"spec": {"type": "object", "properties": spec_props}},
        "x-kubernetes-validations": rules,
    })
}

fn errors(schema: Value) -> Vec<String> {
    Checker::crd(&crd_with(schema))
}

#[track_caller]
fn refused(schema: Value, needle: &str) {
    let errs = errors(schema);
    assert!(
        errs.iter().any(|e| e.contains(needle)),
        "expected an error containing {needle:?}, got {errs:#?}"
    );
}

#[track_caller]
fn accepted(schema: Value) {
    let errs = errors(schema);
    assert!(errs.is_empty(), "expected no errors, got {errs:#?}");
}

/// The rule that broke `kubectl apply -f crds/`, as it was generated.
#[test]
fn the_metadata_name_field_path_the_api_server_refused() {
    let old_broker_rule = json!([{
        "fieldPath": ".metadata.name",
        "message": "Broker names are DNS labels of at most 52 characters",
        "rule": "size(self.metadata.name) <= 52 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    }]);
    let errs = errors(root(json!({}), old_broker_rule));
    assert_eq!(
        errs,
        vec![
            "spec.versions[0].schema.openAPIV3Schema.x-kubernetes-validations[0].fieldPath: \
             Invalid value: \".metadata.name\": fieldPath must be a valid path: does not refer \
             to a valid field"
        ]
    );
    // The same rule without fieldPath is fine: root rules may read
    // metadata.name.
    accepted(root(
        json!({}),
        json!([{"rule": "size(self.metadata.name) <= 52", "message": "m"}]),
    ));
}

#[test]
fn field_paths_resolve_like_the_api_servers() {
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {
                "secretRef": {"type": "object", "properties": {"name": {"type": "string"}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "rules": {"type": "array", "items": {"type": "object", "properties": {"topic": {"type": "string"}}}},
                "odd.name": {"type": "string"},
            }},
        },
    });
    for ok in [
        ".spec",
        ".spec.secretRef.name",
        "['spec']['secretRef'].name",
        ".spec['odd.name']",
        ".spec.labels.anything",
        ".spec.labels['a.b/c']",
    ] {
        assert!(valid_field_path(ok, &schema).is_ok(), "{ok} should resolve");
    }
    for (bad, why) in [
        (".metadata.name", "does not refer to a valid field"),
        (".spec.secretref", "does not refer to a valid field"),
        (".spec.rules[0]", "expected single quoted string but got 0"),
        (".spec.rules.topic", "does not refer to a valid field"),
        (
            ".spec.secretRef.name.more",
            "does not refer to a valid field",
        ),
        ("spec", "expected [ or . but got: spec"),
        (".spec.", "unexpected end of JSON path"),
        (".spec['secretRef'", "unexpected end of JSON path"),
        (
            ".spec[secretRef]",
            "expected single quoted string but got secretRef",
        ),
        (".spec['x\\q']", "invalid escape char"),
    ] {
        match valid_field_path(bad, &schema) {
            Ok(_) => panic!("{bad} should not resolve"),
            Err(e) => assert!(e.contains(why), "{bad}: {e:?} should say {why:?}"),
        }
    }
    // Resolved against the rule's own node, not the root.
    accepted(root(
        json!({"secretRef": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": "self.name != 'x'", "message": "m", "fieldPath": ".name"}],
        }}),
        json!([]),
    ));
    refused(
        root(
            json!({"secretRef": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "self.name != 'x'", "message": "m", "fieldPath": ".spec.secretRef.name"}],
            }}),
            json!([]),
        ),
        "fieldPath must be a valid path",
    );
    refused(
        root(json!({}), json!([{"rule": "true", "fieldPath": " "}])),
        "must be non-empty",
    );
}

#[test]
fn structural_schema_rules() {
    let s = |p: Value| root(p, json!([]));
    refused(
        s(json!({"x": {"description": "no type"}})),
        "must not be empty for specified object fields",
    );
    refused(
        s(json!({"x": {"type": "array", "items": {"description": "no type"}}})),
        "must not be empty for specified array items",
    );
    accepted(s(
        json!({"x": {"x-kubernetes-preserve-unknown-fields": true}}),
    ));
    accepted(s(json!({"x": {"x-kubernetes-int-or-string": true,
                            "anyOf": [{"type": "integer"}, {"type": "string"}]}})));
    refused(s(json!({"x": {"type": "array"}})), "items: Required value");
    refused(
        s(
            json!({"x": {"type": "object", "properties": {"a": {"type": "string"}},
                      "additionalProperties": {"type": "string"}}}),
        ),
        "additionalProperties and properties are mutual exclusive",
    );
    refused(
        s(json!({"x": {"$ref": "#/definitions/y"}})),
        "$ref is not supported",
    );
    refused(
        s(json!({"x": {"type": "object", "definitions": {"y": {"type": "string"}}}})),
        "definitions is not supported",
    );
    refused(
        s(json!({"x": {"type": "object", "patternProperties": {"^a": {"type": "string"}}}})),
        "patternProperties is not supported",
    );
    refused(
        s(json!({"x": {"type": "object", "dependencies": {"a": ["b"]}}})),
        "dependencies is not supported",
    );
    refused(
        s(json!({"x": {"type": "array", "uniqueItems": true, "items": {"type": "string"}}})),
        "uniqueItems cannot be set to true",
    );
    refused(
        s(json!({"x": {"type": "null"}})),
        "type cannot be set to null",
    );
    refused(
        s(json!({"x": {"type": "string", "const": "a"}})),
        "unknown field",
    );
    refused(
        s(json!({"x": {"type": "string", "x-kubernetes-preserve-unknown-fields": false}})),
        "must be true or undefined",
    );
    refused(
        s(json!({"x": {"type": "string", "anyOf": [{"type": "string", "description": "d"}]}})),
        "must be empty to be structural",
    );
    refused(
        s(
            json!({"x": {"type": "object", "properties": {"a": {"type": "string"}},
                      "anyOf": [{"properties": {"b": {"minLength": 1}}}]}}),
        ),
        "must be specified in the structural part",
    );
    refused(
        s(
            json!({"x": {"type": "array", "x-kubernetes-list-type": "map", "items": {"type": "object", "properties": {"k": {"type": "string"}}}}}),
        ),
        "must not be empty if x-kubernetes-list-type is map",
    );
    refused(
        s(
            json!({"x": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"],
                      "items": {"type": "object", "properties": {"k": {"type": "string"}}}}}),
        ),
        "must have a default or be a required property",
    );
    // The root and its metadata.
    refused(
        json!({"type": "object", "nullable": true}),
        "nullable cannot be true at the root",
    );
    refused(
        json!({"type": "object", "additionalProperties": {"type": "string"}}),
        "must not be used at the root",
    );
    refused(json!({"type": "string"}), "must be object at the root");
    refused(
        json!({"type": "object", "default": {}}),
        "are allowed at the root of the schema if the status subresource is enabled",
    );
    refused(
        json!({"type": "object", "properties": {"metadata": {"type": "object", "description": "d"}}}),
        "must not specify anything other than name and generateName",
    );
    refused(
        json!({"type": "object", "properties": {"metadata": {"type": "object", "properties": {
            "namespace": {"type": "string"}}}}}),
        "must not specify anything other than name and generateName",
    );
    accepted(
        json!({"type": "object", "properties": {"metadata": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 52}}}}}),
    );
    refused(
        json!({"type": "object", "properties": {"kind": {"type": "string", "default": "Thing"}}}),
        "must not be set in top-level kind",
    );
    // Defaults must be valid and survive pruning.
    refused(
        s(json!({"x": {"type": "integer", "default": "one"}})),
        "must be of type integer",
    );
    refused(
        s(json!({"x": {"type": "string", "enum": ["a"], "default": "b"}})),
        "not in the enum",
    );
    refused(
        s(
            json!({"x": {"type": "object", "properties": {"a": {"type": "string"}}, "default": {"b": "c"}}}),
        ),
        "it would be pruned",
    );
    refused(
        s(
            json!({"x": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "default": {}}}),
        ),
        "properties[x].default.a: Required value",
    );
    refused(
        s(
            json!({"x": {"type": "object", "properties": {"a": {"type": "integer"}}, "default": {"a": 1},
                      "x-kubernetes-validations": [{"rule": "self.a > 1", "message": "a too small"}]}}),
        ),
        "a too small",
    );
    // Unknown fields anywhere in the CRD.
    let mut crd = crd_with(json!({"type": "object"}));
    crd["spec"]["versions"][0]["servd"] = json!(true);
    assert!(
        Checker::crd(&crd)
            .iter()
            .any(|e| e.contains("spec.versions[0].servd: unknown field"))
    );
}

#[test]
fn cel_rules_compile_name_declared_fields_and_stay_within_cost() {
    let spec = json!({
        "name": {"type": "string", "maxLength": 63},
        "tags": {"type": "array", "items": {"type": "string"}},
        "bounded": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 10}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        "in": {"type": "string"},
        "x-y": {"type": "string"},
    });
    let rule = |r: &str| root(spec.clone(), json!([{"rule": r, "message": "m"}]));
    accepted(rule(
        "self.spec.name.startsWith('a') && has(self.spec.tags)",
    ));
    accepted(rule(
        "self.metadata.name.size() <= 63 && self.kind == 'Thing'",
    ));
    accepted(rule(
        "self.spec.labels.anything == 'x' && self.spec.__in__ == '' && self.spec.x__dash__y == ''",
    ));
    accepted(rule("self.spec.bounded.all(t, t.startsWith('a'))"));
    refused(rule("self.spec.name =="), "compilation failed");
    refused(rule("self.spec.nmae == 'a'"), "undefined field 'nmae'");
    refused(rule("has(self.spec.nope)"), "undefined field 'nope'");
    refused(
        rule("self.spec.name.first == 'a'"),
        "type 'string' does not support field selection",
    );
    refused(
        rule("self.metadata.namespace == 'a'"),
        "undefined field 'namespace'",
    );
    refused(
        rule("self.spec.open.anything == 'a'"),
        "undefined field 'anything'",
    );
    refused(
        rule("object.spec.name == 'a'"),
        "undeclared reference to 'object'",
    );
    refused(
        rule("self.spec.bounded.all(t, t.size() > 0 && u == 1)"),
        "undeclared reference to 'u'",
    );
    // metadata is only there at the root (and in embedded resources).
    refused(
        root(
            json!({"n": {"type": "object", "properties": {"a": {"type": "string"}},
                          "x-kubernetes-validations": [{"rule": "self.metadata.name == 'a'", "message": "m"}]}}),
            json!([]),
        ),
        "undefined field 'metadata'",
    );
    // Messages, reasons, transition rules.
    refused(
        root(
            json!({}),
            json!([{"rule": "true", "message": "two\nlines"}]),
        ),
        "must not contain line breaks",
    );
    refused(
        root(json!({}), json!([{"rule": "true &&\ntrue"}])),
        "message must be specified if rule contains line breaks",
    );
    refused(
        root(json!({}), json!([{"rule": "true", "reason": "Nope"}])),
        "Unsupported value",
    );
    refused(
        root(
            json!({}),
            json!([{"rule": "true", "messageExpression": " "}]),
        ),
        "messageExpression must be non-empty",
    );
    refused(
        root(
            json!({}),
            json!([{"rule": "true", "optionalOldSelf": true}]),
        ),
        "may not be set if oldSelf is not used",
    );
    refused(
        root(
            json!({"list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "m"}]}}}),
            json!([]),
        ),
        "oldSelf cannot be used on the uncorrelatable portion",
    );
    accepted(root(
        json!({"list": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["a"],
            "maxItems": 100,
            "items": {"type": "object", "required": ["a"], "properties": {"a": {"type": "string", "maxLength": 64}},
            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "m"}]}}}),
        json!([]),
    ));
    // Cost: unbounded strings in unbounded lists, and comprehensions over them.
    refused(
        rule("self.spec.tags.all(t, t.matches('^[a-z]+$'))"),
        "exceeds budget",
    );
    refused(
        root(
            json!({"tags": {"type": "array", "items": {"type": "string",
            "x-kubernetes-validations": [{"rule": "self.contains('abcdefghijklmnop')", "message": "m"}]}}}),
            json!([]),
        ),
        "exceeds budget",
    );
    accepted(root(
        json!({"tags": {"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 64,
            "x-kubernetes-validations": [{"rule": "!self.startsWith('$share/')", "message": "m"}]}}}),
        json!([]),
    ));
}

// What an offline check cannot see, compared with a real API server:
//
// * Type checking of CEL beyond field names: cel-go checks every function's
//   argument types and overloads (e.g. `size(self.replicas)` on an integer,
//   `int < string`), and which Kubernetes CEL libraries exist at the API
//   server's compatibility version; kube-cel only parses, and this file only
//   resolves `self`/`oldSelf` field chains.
// * The exact cost: cel-go's estimator is approximated above for the
//   functions these CRDs use; a rule near the limits needs the real server.
// * Go's RE2 regular expressions (`pattern`, `matches`) versus regex-lite;
//   OpenAPI `format` names the server knows.
// * Anything that depends on state: an existing CRD (stored versions that a
//   new CRD drops, ratcheting of unchanged expressions, name conflicts with
//   other groups' short names or categories), admission webhooks and
//   policies, RBAC, and whether the API server's version still serves
//   apiextensions.k8s.io/v1 the same way.
// * How the server then validates and prunes objects (that is what
//   `src/crd/cel_tests.rs` approximates with kube-cel).
// * In the other direction, this file is stricter than the server where
//   kube-cel is: it cannot parse CEL's optional syntax (`self.?field`), which
//   the server accepts, so a rule using it fails here.
// * `kubectl` does not help offline: `kubectl apply --dry-run=client
//   --validate=false -f crds/` still needs a server for discovery ("unable
//   to recognize ... connection refused") and checks nothing but YAML syntax.
