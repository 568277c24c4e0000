//! Pruning configuration: parsed from the reference implementation's JSON keys, validated
//! against the model's layer count, and echoed back as the effective config.

use serde_json::{json, Map, Value};

/// A configuration error; every message is one line naming the key and what it accepts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not JSON at all.
    #[error("pruning config is not valid JSON: {0}")]
    Json(String),
    /// The top level is not an object.
    #[error("pruning config must be a JSON object, got {0}")]
    NotAnObject(String),
    /// `method` names no known pruner.
    #[error("`method` must be one of {METHODS_TEXT}; got {0}")]
    UnknownMethod(String),
    /// A token budget outside what the method and the model allow.
    #[error("`keep` = {value} is out of range for method {method}: must be an integer in {range}")]
    Budget {
        method: &'static str,
        value: String,
        range: String,
    },
    /// A budget given to a method that takes none, or none given to one that needs one.
    #[error("method {method} {reason}")]
    BudgetUse {
        method: &'static str,
        reason: &'static str,
    },
    /// A key the chosen method does not accept.
    #[error("unknown key `{key}` for method {method} (allowed: {allowed})")]
    UnknownKey {
        key: String,
        method: &'static str,
        allowed: &'static str,
    },
    /// A value of the wrong JSON type.
    #[error("`{key}` must be {expected}, got {got}")]
    Type {
        key: &'static str,
        expected: &'static str,
        got: String,
    },
    /// A `mode` entry that is not a stage name.
    #[error("`mode` entry {0} is unknown (allowed: \"shallow\", \"middle\", \"deep\")")]
    UnknownStage(String),
    /// A stage listed twice in `mode`.
    #[error("`mode` lists \"{0}\" more than once")]
    RepeatedStage(&'static str),
    /// A key the chosen stages need is absent.
    #[error("`{key}` is required {when} (must be {range})")]
    Missing {
        key: &'static str,
        when: &'static str,
        range: String,
    },
    /// A value outside its allowed range.
    #[error("`{key}` = {value} is out of range: must be {range}")]
    OutOfRange {
        key: &'static str,
        value: String,
        range: String,
    },
}

/// Which VisiPruner stages are enabled (the reference's `mode` list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    /// Mask image keys in layers below `shallow_mid_layer`.
    pub shallow: bool,
    /// Detect the fusion layer and keep only the contributing image tokens.
    pub middle: bool,
    /// Drop all image tokens once the model stops reading them.
    pub deep: bool,
}

impl Mode {
    /// Stage names in canonical order, as written in the effective config.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.shallow, "shallow"),
            (self.middle, "middle"),
            (self.deep, "deep"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// What the shallow stage does at layer 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layer0Policy {
    /// Fold each text query's image attention into the first image key (reference, 7B).
    #[default]
    Sink,
    /// Hide image keys from image queries and the first half of the span from text (13B).
    Split,
    /// No mask at layer 0.
    None,
}

impl Layer0Policy {
    /// The JSON spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Layer0Policy::Sink => "sink",
            Layer0Policy::Split => "split",
            Layer0Policy::None => "none",
        }
    }
}

/// VisiPruner settings. Keys are optional here because only the enabled stages need them;
/// [`PruneConfig::validate`] enforces presence and ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct VisiConfig {
    /// Enabled stages.
    pub mode: Mode,
    /// First non-shallow layer; middle fires only on layers strictly above it.
    pub shallow_mid_layer: Option<usize>,
    /// Fusion fires when some token's leave-one-out cosine falls below this.
    pub layer_threshold: Option<f64>,
    /// Tokens whose contribution norm exceeds this survive fusion.
    pub tokens_threshold: Option<f64>,
    /// With deep but not middle: first layer that runs text only.
    pub mid_deep_layer: Option<usize>,
    /// Layer-0 mask policy (ours, not the reference's).
    pub layer0: Layer0Policy,
}

/// FastV settings: after layer `k - 1`, keep the image tokens the last prompt token
/// attends to most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FastVConfig {
    /// First layer that runs on the pruned sequence (FastV's K).
    pub k: usize,
    /// Fraction of image tokens dropped (FastV's R); used when `keep` is `None`.
    pub ratio: f64,
    /// A fixed budget instead of `ratio`: this many image tokens of the whole prompt survive
    /// (FastV ranks every image token of the prompt together).
    pub keep: Option<usize>,
}

/// FastV's K when only a budget is given (`{"method":"fastv","keep":N}`, `--prune fastv:N`):
/// the paper's default, K = 2.
pub const FASTV_DEFAULT_K: usize = 2;
/// FastV's R for the bare short form `--prune fastv`: the paper's default, R = 50%.
pub const FASTV_DEFAULT_RATIO: f64 = 0.5;

/// DivPrune settings (Alvar et al., CVPR 2025; github.com/vbdi/divprune): before the decoder,
/// keep the `keep` image tokens of each image span chosen by greedy max-min diversity
/// over the projected image embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DivPruneConfig {
    /// Image tokens kept per image span.
    pub keep: usize,
}

/// A parsed pruning configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum PruneConfig {
    /// No pruning and no masks.
    Dense,
    /// VisiPruner (the default method).
    VisiPruner(VisiConfig),
    /// FastV.
    FastV(FastVConfig),
    /// DivPrune (selects before the decoder).
    DivPrune(DivPruneConfig),
}

/// Every method name `method` (and the short form) accepts, as error messages list them.
const METHODS_TEXT: &str = "\"visipruner\", \"fastv\", \"divprune\", \"dense\" (or \"none\")";

const VISI_KEYS: &[&str] = &[
    "method",
    "mode",
    "shallow_mid_layer",
    "layer_threshold",
    "tokens_threshold",
    "mid_deep_layer",
    "layer0",
];
const VISI_KEYS_TEXT: &str =
    "method, mode, shallow_mid_layer, layer_threshold, tokens_threshold, mid_deep_layer, layer0";
const FASTV_KEYS: &[&str] = &["method", "k", "ratio", "keep"];
const FASTV_KEYS_TEXT: &str = "method, k, ratio, keep";
const DIVPRUNE_KEYS: &[&str] = &["method", "keep"];
const DENSE_KEYS: &[&str] = &["method"];

impl PruneConfig {
    /// The paper's setting: all three stages, shallow_mid_layer 6, thresholds 0.995 / 0.2.
    pub fn paper_default() -> Self {
        PruneConfig::VisiPruner(VisiConfig {
            mode: Mode {
                shallow: true,
                middle: true,
                deep: true,
            },
            shallow_mid_layer: Some(6),
            layer_threshold: Some(0.995),
            tokens_threshold: Some(0.2),
            mid_deep_layer: None,
            layer0: Layer0Policy::Sink,
        })
    }

    /// The paper's config for a `num_layers`-deep decoder. The paper's `shallow_mid_layer` 6
    /// (of 32 layers) leaves no legal fusion layer on shallow models (the 6-layer test
    /// fixtures): there it is scaled by depth, `round(6 * num_layers / 32)`, at least 1, and
    /// the note says so. Dense, with a note, when even that does not fit.
    pub fn paper_default_for(num_layers: usize) -> (Self, Option<String>) {
        let mut cfg = Self::paper_default();
        let mut note = None;
        if let PruneConfig::VisiPruner(v) = &mut cfg {
            if let Some(s) = v.shallow_mid_layer {
                if s + 3 > num_layers {
                    let scaled = ((s * num_layers + 16) / 32).max(1);
                    v.shallow_mid_layer = Some(scaled);
                    note = Some(format!(
                        "{num_layers}-layer model: the paper's VisiPruner config with shallow_mid_layer {s} scaled to {scaled}"
                    ));
                }
            }
        }
        match cfg.validate(num_layers) {
            Ok(()) => (cfg, note),
            Err(e) => (
                PruneConfig::Dense,
                Some(format!(
                    "the paper's VisiPruner config does not fit this {num_layers}-layer model ({e}); running dense"
                )),
            ),
        }
    }

    /// Parses JSON text; checks everything but the layer keys, which need the model
    /// ([`PruneConfig::validate`]).
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_value(&v)
    }

    /// Parses a JSON value; checks everything but the layer keys, which need the model.
    pub fn from_value(v: &Value) -> Result<Self, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError::NotAnObject(json_type(v).to_string()))?;
        let method = match obj.get("method") {
            None => "visipruner",
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(ConfigError::Type {
                    key: "method",
                    expected: "a string",
                    got: short(other),
                })
            }
        };
        let cfg = match method {
            "visipruner" => {
                check_keys(obj, VISI_KEYS, "visipruner", VISI_KEYS_TEXT)?;
                PruneConfig::VisiPruner(VisiConfig {
                    mode: get_mode(obj)?,
                    shallow_mid_layer: get_layer(obj, "shallow_mid_layer")?,
                    layer_threshold: get_f64(obj, "layer_threshold")?,
                    tokens_threshold: get_f64(obj, "tokens_threshold")?,
                    mid_deep_layer: get_layer(obj, "mid_deep_layer")?,
                    layer0: get_layer0(obj)?,
                })
            }
            "fastv" => {
                check_keys(obj, FASTV_KEYS, "fastv", FASTV_KEYS_TEXT)?;
                let keep = get_keep(obj, "fastv")?;
                if keep.is_some() && obj.contains_key("ratio") {
                    return Err(ConfigError::BudgetUse {
                        method: "fastv",
                        reason: "takes `ratio` or `keep`, not both",
                    });
                }
                let k = match (get_layer(obj, "k")?, keep) {
                    (Some(k), _) => k,
                    // A bare budget runs at the paper's K.
                    (None, Some(_)) => FASTV_DEFAULT_K,
                    (None, None) => {
                        return Err(ConfigError::Missing {
                            key: "k",
                            when: "for method fastv",
                            range: LAYER_RANGE_UNKNOWN.to_string(),
                        })
                    }
                };
                let ratio = match keep {
                    Some(_) => 0.0,
                    None => get_f64(obj, "ratio")?.ok_or_else(|| ConfigError::Missing {
                        key: "ratio",
                        when: "for method fastv (or give `keep`)",
                        range: RATIO_RANGE.to_string(),
                    })?,
                };
                PruneConfig::FastV(FastVConfig { k, ratio, keep })
            }
            "divprune" => {
                check_keys(obj, DIVPRUNE_KEYS, "divprune", "method, keep")?;
                let keep = get_keep(obj, "divprune")?.ok_or(ConfigError::BudgetUse {
                    method: "divprune",
                    reason: "needs a budget: `keep`, an integer in [1, image tokens per image] (short form divprune:N)",
                })?;
                PruneConfig::DivPrune(DivPruneConfig { keep })
            }
            "dense" | "none" => {
                check_keys(obj, DENSE_KEYS, "dense", "method")?;
                PruneConfig::Dense
            }
            other => return Err(ConfigError::UnknownMethod(format!("\"{other}\""))),
        };
        cfg.check(None)?;
        Ok(cfg)
    }

    /// Checks presence and ranges against a model with `num_layers` decoder layers.
    pub fn validate(&self, num_layers: usize) -> Result<(), ConfigError> {
        self.check(Some(num_layers))
    }

    /// The method name used in reports.
    pub fn method(&self) -> &'static str {
        match self {
            PruneConfig::Dense => "dense",
            PruneConfig::VisiPruner(_) => "visipruner",
            PruneConfig::FastV(_) => "fastv",
            PruneConfig::DivPrune(_) => "divprune",
        }
    }

    /// The fixed token budget, when the method runs at one (`keep`).
    pub fn keep(&self) -> Option<usize> {
        match self {
            PruneConfig::FastV(f) => f.keep,
            PruneConfig::DivPrune(d) => Some(d.keep),
            PruneConfig::Dense | PruneConfig::VisiPruner(_) => None,
        }
    }

    /// Whether the method selects image tokens before the decoder, from the image
    /// embeddings alone (no attention weights in the decoder).
    pub fn selects_before_decoder(&self) -> bool {
        matches!(self, PruneConfig::DivPrune(_))
    }

    /// Parses a `--prune` value: JSON (it starts with `{`) or the short form `METHOD` /
    /// `METHOD:KEEP`: `none` (or `dense`), `visipruner` (the paper's config; adaptive, no
    /// budget), `fastv` (the paper's K = 2, R = 50%), `fastv:N` (K = 2, N tokens kept),
    /// `divprune:N`.
    pub fn parse_arg(text: &str) -> Result<Self, ConfigError> {
        let t = text.trim();
        if t.starts_with('{') {
            return Self::from_json(t);
        }
        let (name, budget) = match t.split_once(':') {
            Some((n, b)) => (n.trim(), Some(b.trim())),
            None => (t, None),
        };
        let method: &'static str = match name {
            "none" | "dense" => "dense",
            "visipruner" => "visipruner",
            "fastv" => "fastv",
            "divprune" => "divprune",
            other => return Err(ConfigError::UnknownMethod(format!("\"{other}\""))),
        };
        let keep = match budget {
            None => None,
            Some(b) => Some(match b.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(ConfigError::Budget {
                        method,
                        value: format!("\"{b}\""),
                        range: keep_range_unknown(method).to_string(),
                    })
                }
            }),
        };
        match (method, keep) {
            ("dense", None) => Ok(PruneConfig::Dense),
            ("visipruner", None) => Ok(Self::paper_default()),
            ("dense", Some(_)) => Err(ConfigError::BudgetUse {
                method,
                reason: "prunes nothing and takes no budget",
            }),
            ("visipruner", Some(_)) => Err(ConfigError::BudgetUse {
                method,
                reason: "is adaptive and takes no budget (it reports what it kept); use `--prune visipruner`",
            }),
            ("fastv", None) => Ok(PruneConfig::FastV(FastVConfig {
                k: FASTV_DEFAULT_K,
                ratio: FASTV_DEFAULT_RATIO,
                keep: None,
            })),
            ("fastv", Some(n)) => Ok(PruneConfig::FastV(FastVConfig {
                k: FASTV_DEFAULT_K,
                ratio: 0.0,
                keep: Some(n),
            })),
            (_, Some(n)) => Ok(PruneConfig::DivPrune(DivPruneConfig { keep: n })),
            (_, None) => Err(ConfigError::BudgetUse {
                method,
                reason: "needs a budget: METHOD:N with N in [1, image tokens per image], e.g. divprune:64",
            }),
        }
    }

    /// Checks the budget against the image spans of a prompt (`image_tokens[i]`: the tokens
    /// of span `i`). A per-image budget (DivPrune) must fit every span; FastV's prompt-wide
    /// one the prompt's image tokens together. A prompt without images runs anything.
    pub fn check_budget(&self, image_tokens: &[usize]) -> Result<(), ConfigError> {
        let (Some(keep), false) = (self.keep(), image_tokens.is_empty()) else {
            return Ok(());
        };
        let (max, what) = match self {
            PruneConfig::FastV(_) => (
                image_tokens.iter().sum::<usize>(),
                "image tokens of the prompt",
            ),
            _ => (
                image_tokens.iter().copied().min().unwrap_or(0),
                "image tokens per image",
            ),
        };
        if keep >= 1 && keep <= max {
            Ok(())
        } else {
            Err(ConfigError::Budget {
                method: self.method(),
                value: keep.to_string(),
                range: format!("[1, {max}] (the {what})"),
            })
        }
    }

    /// The effective configuration as JSON (defaults filled in); parses back to `self`.
    pub fn to_json(&self) -> Value {
        match self {
            PruneConfig::Dense => json!({ "method": "dense" }),
            PruneConfig::FastV(f) => match f.keep {
                Some(n) => json!({ "method": "fastv", "k": f.k, "keep": n }),
                None => json!({ "method": "fastv", "k": f.k, "ratio": f.ratio }),
            },
            PruneConfig::DivPrune(d) => json!({ "method": "divprune", "keep": d.keep }),
            PruneConfig::VisiPruner(v) => {
                let mut m = Map::new();
                m.insert("method".into(), json!("visipruner"));
                m.insert("mode".into(), json!(v.mode.names()));
                if let Some(x) = v.shallow_mid_layer {
                    m.insert("shallow_mid_layer".into(), json!(x));
                }
                if let Some(x) = v.layer_threshold {
                    m.insert("layer_threshold".into(), json!(x));
                }
                if let Some(x) = v.tokens_threshold {
                    m.insert("tokens_threshold".into(), json!(x));
                }
                if let Some(x) = v.mid_deep_layer {
                    m.insert("mid_deep_layer".into(), json!(x));
                }
                m.insert("layer0".into(), json!(v.layer0.as_str()));
                Value::Object(m)
            }
        }
    }

    /// Presence and range checks. While parsing `num_layers` is unknown, and layer keys are
    /// left to [`PruneConfig::validate`] so their errors can state the concrete range.
    fn check(&self, num_layers: Option<usize>) -> Result<(), ConfigError> {
        match self {
            PruneConfig::Dense => Ok(()),
            PruneConfig::FastV(f) => {
                if let Some(n) = num_layers {
                    check_layer("k", f.k, n)?;
                }
                if let Some(n) = f.keep {
                    check_keep("fastv", n)?;
                    return Ok(());
                }
                // NaN fails both comparisons, so it is rejected too.
                if !(f.ratio >= 0.0 && f.ratio < 1.0) {
                    return Err(ConfigError::OutOfRange {
                        key: "ratio",
                        value: f.ratio.to_string(),
                        range: RATIO_RANGE.to_string(),
                    });
                }
                Ok(())
            }
            PruneConfig::VisiPruner(v) => v.check(num_layers),
            PruneConfig::DivPrune(d) => check_keep("divprune", d.keep),
        }
    }
}

impl VisiConfig {
    fn check(&self, num_layers: Option<usize>) -> Result<(), ConfigError> {
        let m = self.mode;
        if let Some(n) = num_layers {
            require(
                self.shallow_mid_layer.is_some(),
                m.shallow || m.middle,
                "shallow_mid_layer",
                "when mode contains shallow or middle",
                layer_range(n),
            )?;
            if let Some(x) = self.shallow_mid_layer {
                check_layer("shallow_mid_layer", x, n)?;
            }
        }
        for (key, value) in [
            ("layer_threshold", self.layer_threshold),
            ("tokens_threshold", self.tokens_threshold),
        ] {
            require(
                value.is_some(),
                m.middle,
                key,
                "when mode contains middle",
                THRESHOLD_RANGE.to_string(),
            )?;
            if let Some(t) = value {
                if !(t > 0.0 && t < 1.0) {
                    return Err(ConfigError::OutOfRange {
                        key,
                        value: t.to_string(),
                        range: THRESHOLD_RANGE.to_string(),
                    });
                }
            }
        }
        if let Some(n) = num_layers {
            require(
                self.mid_deep_layer.is_some(),
                m.deep && !m.middle,
                "mid_deep_layer",
                "when mode contains deep without middle",
                layer_range(n),
            )?;
            if let Some(x) = self.mid_deep_layer {
                check_layer("mid_deep_layer", x, n)?;
            }
        }
        Ok(())
    }
}

const THRESHOLD_RANGE: &str = "a float in (0, 1)";
const RATIO_RANGE: &str = "a float in [0, 1)";

fn layer_range(num_layers: usize) -> String {
    format!("an integer in [1, {num_layers})")
}

/// The layer range before the model is known (only negative values fail that early).
const LAYER_RANGE_UNKNOWN: &str = "an integer in [1, num_layers)";

/// The budget range before the prompt's images are known.
const KEEP_RANGE_UNKNOWN: &str = "[1, image tokens per image]";

/// [`KEEP_RANGE_UNKNOWN`], or FastV's prompt-wide one.
fn keep_range_unknown(method: &str) -> &'static str {
    if method == "fastv" {
        "[1, image tokens of the prompt]"
    } else {
        KEEP_RANGE_UNKNOWN
    }
}

fn check_keep(method: &'static str, keep: usize) -> Result<(), ConfigError> {
    if keep >= 1 {
        Ok(())
    } else {
        Err(ConfigError::Budget {
            method,
            value: keep.to_string(),
            range: keep_range_unknown(method).to_string(),
        })
    }
}

/// `keep`: a positive JSON integer (its upper bound needs the prompt's images).
fn get_keep(obj: &Map<String, Value>, method: &'static str) -> Result<Option<usize>, ConfigError> {
    let Some(v) = obj.get("keep") else {
        return Ok(None);
    };
    match v.as_u64().and_then(|u| usize::try_from(u).ok()) {
        Some(n) if n >= 1 => Ok(Some(n)),
        _ => Err(ConfigError::Budget {
            method,
            value: short(v),
            range: keep_range_unknown(method).to_string(),
        }),
    }
}

/// Fails when a key the enabled stages `need` is not `present`.
fn require(
    present: bool,
    needed: bool,
    key: &'static str,
    when: &'static str,
    range: String,
) -> Result<(), ConfigError> {
    if present || !needed {
        Ok(())
    } else {
        Err(ConfigError::Missing { key, when, range })
    }
}

fn check_layer(key: &'static str, x: usize, num_layers: usize) -> Result<(), ConfigError> {
    if (1..num_layers).contains(&x) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            key,
            value: x.to_string(),
            range: layer_range(num_layers),
        })
    }
}

fn check_keys(
    obj: &Map<String, Value>,
    allowed: &[&str],
    method: &'static str,
    allowed_text: &'static str,
) -> Result<(), ConfigError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(ConfigError::UnknownKey {
            key: key.clone(),
            method,
            allowed: allowed_text,
        }),
        None => Ok(()),
    }
}

/// A layer index: a non-negative JSON integer (its range needs the model).
fn get_layer(obj: &Map<String, Value>, key: &'static str) -> Result<Option<usize>, ConfigError> {
    let Some(v) = obj.get(key) else {
        return Ok(None);
    };
    let type_err = || ConfigError::Type {
        key,
        expected: "an integer",
        got: short(v),
    };
    let Value::Number(n) = v else {
        return Err(type_err());
    };
    if let Some(u) = n.as_u64() {
        // A value beyond usize is out of range for any model, not a type error.
        return usize::try_from(u)
            .map(Some)
            .map_err(|_| ConfigError::OutOfRange {
                key,
                value: u.to_string(),
                range: LAYER_RANGE_UNKNOWN.to_string(),
            });
    }
    if let Some(i) = n.as_i64() {
        return Err(ConfigError::OutOfRange {
            key,
            value: i.to_string(),
            range: LAYER_RANGE_UNKNOWN.to_string(),
        });
    }
    Err(type_err())
}

fn get_f64(obj: &Map<String, Value>, key: &'static str) -> Result<Option<f64>, ConfigError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| ConfigError::Type {
            key,
            expected: "a number",
            got: n.to_string(),
        }),
        Some(other) => Err(ConfigError::Type {
            key,
            expected: "a number",
            got: short(other),
        }),
    }
}

fn get_mode(obj: &Map<String, Value>) -> Result<Mode, ConfigError> {
    let type_err = |v: &Value| ConfigError::Type {
        key: "mode",
        expected: "a list of strings drawn from \"shallow\", \"middle\", \"deep\"",
        got: short(v),
    };
    let Some(v) = obj.get("mode") else {
        return Err(ConfigError::Missing {
            key: "mode",
            when: "for method visipruner",
            range: "a list drawn from \"shallow\", \"middle\", \"deep\"".to_string(),
        });
    };
    let list = v.as_array().ok_or_else(|| type_err(v))?;
    let mut mode = Mode::default();
    for entry in list {
        let name = entry.as_str().ok_or_else(|| type_err(v))?;
        let (slot, canonical) = match name {
            "shallow" => (&mut mode.shallow, "shallow"),
            "middle" => (&mut mode.middle, "middle"),
            "deep" => (&mut mode.deep, "deep"),
            _ => return Err(ConfigError::UnknownStage(short(entry))),
        };
        if *slot {
            return Err(ConfigError::RepeatedStage(canonical));
        }
        *slot = true;
    }
    Ok(mode)
}

fn get_layer0(obj: &Map<String, Value>) -> Result<Layer0Policy, ConfigError> {
    match obj.get("layer0") {
        None => Ok(Layer0Policy::default()),
        Some(Value::String(s)) => match s.as_str() {
            "sink" => Ok(Layer0Policy::Sink),
            "split" => Ok(Layer0Policy::Split),
            "none" => Ok(Layer0Policy::None),
            _ => Err(ConfigError::OutOfRange {
                key: "layer0",
                value: format!("\"{s}\""),
                range: "one of \"sink\", \"split\", \"none\"".to_string(),
            }),
        },
        Some(other) => Err(ConfigError::Type {
            key: "layer0",
            expected: "a string",
            got: short(other),
        }),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The value as compact JSON, cut short so an error stays on one readable line.
fn short(v: &Value) -> String {
    const MAX: usize = 40;
    let s = v.to_string();
    if s.chars().count() <= MAX {
        s
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_default_scaled_to_depth() {
        let mid = |n: usize| match PruneConfig::paper_default_for(n) {
            (PruneConfig::VisiPruner(v), note) => (v.shallow_mid_layer, note.is_some()),
            (other, _) => panic!("{n} layers: {other:?}"),
        };
        // The paper's own depth and deeper: as published, no note.
        assert_eq!(mid(32), (Some(6), false));
        assert_eq!(mid(9), (Some(6), false));
        // Shallower: round(6 n / 32), at least 1, with a note.
        assert_eq!(mid(8), (Some(2), true));
        assert_eq!(mid(6), (Some(1), true));
        assert_eq!(mid(2), (Some(1), true));
        // One layer leaves no legal layer at all: dense, said in the note.
        let (c, note) = PruneConfig::paper_default_for(1);
        assert_eq!(c, PruneConfig::Dense);
        assert!(note.is_some_and(|n| n.contains("dense")));
    }

    fn parse(text: &str) -> Result<PruneConfig, ConfigError> {
        PruneConfig::from_json(text)
    }

    /// Parses and validates against `n` layers; the error text must name `key` and `needle`.
    fn expect_err(text: &str, n: usize, key: &str, needle: &str) {
        let res = parse(text).and_then(|c| c.validate(n).map(|_| c));
        let err = match res {
            Ok(c) => panic!("config {text} with {n} layers: expected an error, parsed {c:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(key) && err.contains(needle),
            "config {text} with {n} layers: error {err:?} should mention {key:?} and {needle:?}"
        );
        assert!(!err.contains('\n'), "error must be one line: {err:?}");
    }

    #[test]
    fn paper_default_parses_and_round_trips() {
        let text = r#"{"mode":["shallow","middle","deep"],"shallow_mid_layer":6,"layer_threshold":0.995,"tokens_threshold":0.2}"#;
        let cfg = parse(text).unwrap();
        assert_eq!(cfg, PruneConfig::paper_default());
        cfg.validate(32).unwrap();
        let eff = cfg.to_json();
        assert_eq!(eff["method"], "visipruner");
        assert_eq!(eff["layer0"], "sink");
        assert_eq!(eff["layer_threshold"], 0.995);
        assert!(eff.get("mid_deep_layer").is_none());
        assert_eq!(PruneConfig::from_value(&eff).unwrap(), cfg);
    }

    #[test]
    fn every_variant_round_trips_through_to_json() {
        let texts = [
            r#"{"method":"dense"}"#,
            r#"{"method":"fastv","k":2,"ratio":0.5}"#,
            r#"{"mode":[]}"#,
            r#"{"mode":["deep","shallow"],"shallow_mid_layer":3,"mid_deep_layer":20,"layer0":"split"}"#,
            r#"{"mode":["middle"],"shallow_mid_layer":1,"layer_threshold":0.5,"tokens_threshold":0.9,"layer0":"none"}"#,
        ];
        for text in texts {
            let cfg = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let back = PruneConfig::from_value(&cfg.to_json())
                .unwrap_or_else(|e| panic!("{text}: effective config does not parse: {e}"));
            assert_eq!(back, cfg, "{text}: round trip changed the config");
        }
    }

    #[test]
    fn mode_order_is_free_and_echoed_canonically() {
        let cfg = parse(r#"{"mode":["deep","shallow"],"shallow_mid_layer":3,"mid_deep_layer":9}"#)
            .unwrap();
        assert_eq!(cfg.to_json()["mode"], json!(["shallow", "deep"]));
    }

    #[test]
    fn method_defaults_to_visipruner_and_layer0_to_sink() {
        let PruneConfig::VisiPruner(v) =
            parse(r#"{"mode":["shallow"],"shallow_mid_layer":2}"#).unwrap()
        else {
            panic!("method should default to visipruner");
        };
        assert_eq!(v.layer0, Layer0Policy::Sink);
    }

    #[test]
    fn structural_errors() {
        expect_err("{", 32, "not valid JSON", "");
        expect_err("[1]", 32, "JSON object", "a list");
        expect_err(r#"{"method":"tome"}"#, 32, "method", "\"tome\"");
        expect_err(r#"{"method":3}"#, 32, "method", "a string");
        expect_err(
            r#"{"mode":[],"foo":1}"#,
            32,
            "`foo`",
            "allowed: method, mode",
        );
        expect_err(
            r#"{"method":"fastv","k":2,"ratio":0.5,"mode":[]}"#,
            32,
            "`mode`",
            "fastv",
        );
        expect_err(r#"{"method":"dense","k":2}"#, 32, "`k`", "dense");
    }

    #[test]
    fn mode_errors() {
        expect_err(r#"{}"#, 32, "`mode`", "required");
        expect_err(
            r#"{"mode":"shallow","shallow_mid_layer":6}"#,
            32,
            "`mode`",
            "list of strings",
        );
        expect_err(r#"{"mode":[1]}"#, 32, "`mode`", "list of strings");
        expect_err(r#"{"mode":["early"]}"#, 32, "\"early\"", "unknown");
        expect_err(
            r#"{"mode":["deep","deep"],"mid_deep_layer":4}"#,
            32,
            "\"deep\"",
            "more than once",
        );
    }

    #[test]
    fn shallow_mid_layer_errors() {
        // Required by shallow and by middle, not by deep alone.
        expect_err(
            r#"{"mode":["shallow"]}"#,
            32,
            "shallow_mid_layer",
            "required",
        );
        expect_err(
            r#"{"mode":["middle"],"layer_threshold":0.9,"tokens_threshold":0.2}"#,
            32,
            "shallow_mid_layer",
            "[1, 32)",
        );
        parse(r#"{"mode":["deep"],"mid_deep_layer":5}"#)
            .unwrap()
            .validate(32)
            .unwrap();
        // Range [1, num_layers): 0 and num_layers are out, 31 is in.
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":0}"#,
            32,
            "shallow_mid_layer",
            "[1, 32)",
        );
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":32}"#,
            32,
            "shallow_mid_layer",
            "[1, 32)",
        );
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":-1}"#,
            32,
            "shallow_mid_layer",
            "-1",
        );
        parse(r#"{"mode":["shallow"],"shallow_mid_layer":31}"#)
            .unwrap()
            .validate(32)
            .unwrap();
        // Types: floats and strings are not integers.
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":6.0}"#,
            32,
            "shallow_mid_layer",
            "integer",
        );
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":"6"}"#,
            32,
            "shallow_mid_layer",
            "integer",
        );
        // Validated whenever present, even if unused.
        expect_err(
            r#"{"mode":[],"shallow_mid_layer":40}"#,
            32,
            "shallow_mid_layer",
            "[1, 32)",
        );
    }

    #[test]
    fn threshold_errors() {
        let base = r#""mode":["middle"],"shallow_mid_layer":6"#;
        expect_err(
            &format!("{{{base},\"tokens_threshold\":0.2}}"),
            32,
            "layer_threshold",
            "required",
        );
        expect_err(
            &format!("{{{base},\"layer_threshold\":0.9}}"),
            32,
            "tokens_threshold",
            "required",
        );
        for key in ["layer_threshold", "tokens_threshold"] {
            let other = if key == "layer_threshold" {
                "tokens_threshold"
            } else {
                "layer_threshold"
            };
            for bad in ["0", "1", "0.0", "1.0", "-0.5", "2"] {
                let text = format!("{{{base},\"{other}\":0.5,\"{key}\":{bad}}}");
                expect_err(&text, 32, key, "(0, 1)");
            }
            let text = format!("{{{base},\"{other}\":0.5,\"{key}\":\"0.5\"}}");
            expect_err(&text, 32, key, "a number");
        }
        // Not required without middle, but still checked when given.
        parse(r#"{"mode":["shallow"],"shallow_mid_layer":6}"#).unwrap();
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":6,"layer_threshold":1.5}"#,
            32,
            "layer_threshold",
            "(0, 1)",
        );
    }

    #[test]
    fn mid_deep_layer_errors() {
        expect_err(
            r#"{"mode":["deep"]}"#,
            32,
            "mid_deep_layer",
            "deep without middle",
        );
        expect_err(
            r#"{"mode":["deep"],"mid_deep_layer":0}"#,
            32,
            "mid_deep_layer",
            "[1, 32)",
        );
        expect_err(
            r#"{"mode":["deep"],"mid_deep_layer":32}"#,
            32,
            "mid_deep_layer",
            "[1, 32)",
        );
        expect_err(
            r#"{"mode":["deep"],"mid_deep_layer":2.5}"#,
            32,
            "mid_deep_layer",
            "integer",
        );
        // With middle it is optional (the reference validates but ignores it).
        let cfg = r#"{"mode":["middle","deep"],"shallow_mid_layer":6,"layer_threshold":0.9,"tokens_threshold":0.2}"#;
        parse(cfg).unwrap().validate(32).unwrap();
        let cfg = r#"{"mode":["middle","deep"],"shallow_mid_layer":6,"layer_threshold":0.9,"tokens_threshold":0.2,"mid_deep_layer":99}"#;
        expect_err(cfg, 32, "mid_deep_layer", "[1, 32)");
    }

    #[test]
    fn layer0_errors() {
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":6,"layer0":"half"}"#,
            32,
            "layer0",
            "\"sink\"",
        );
        expect_err(
            r#"{"mode":["shallow"],"shallow_mid_layer":6,"layer0":0}"#,
            32,
            "layer0",
            "a string",
        );
    }

    #[test]
    fn fastv_errors() {
        let ok = parse(r#"{"method":"fastv","k":2,"ratio":0.5}"#).unwrap();
        assert_eq!(
            ok,
            PruneConfig::FastV(FastVConfig {
                k: 2,
                ratio: 0.5,
                keep: None
            })
        );
        ok.validate(32).unwrap();
        expect_err(r#"{"method":"fastv","ratio":0.5}"#, 32, "`k`", "required");
        expect_err(r#"{"method":"fastv","k":2}"#, 32, "`ratio`", "[0, 1)");
        expect_err(
            r#"{"method":"fastv","k":0,"ratio":0.5}"#,
            32,
            "`k`",
            "[1, 32)",
        );
        expect_err(
            r#"{"method":"fastv","k":32,"ratio":0.5}"#,
            32,
            "`k`",
            "[1, 32)",
        );
        expect_err(
            r#"{"method":"fastv","k":2,"ratio":1}"#,
            32,
            "`ratio`",
            "[0, 1)",
        );
        expect_err(
            r#"{"method":"fastv","k":2,"ratio":-0.1}"#,
            32,
            "`ratio`",
            "[0, 1)",
        );
        expect_err(
            r#"{"method":"fastv","k":2,"ratio":"half"}"#,
            32,
            "`ratio`",
            "a number",
        );
        parse(r#"{"method":"fastv","k":31,"ratio":0}"#)
            .unwrap()
            .validate(32)
            .unwrap();
    }

    #[test]
    fn budgets_for_every_budgeted_method() {
        let f = parse(r#"{"method":"fastv","keep":64}"#).unwrap();
        assert_eq!(
            f,
            PruneConfig::FastV(FastVConfig {
                k: FASTV_DEFAULT_K,
                ratio: 0.0,
                keep: Some(64)
            })
        );
        assert_eq!(f.keep(), Some(64));
        assert_eq!(f.to_json(), json!({"method":"fastv","k":2,"keep":64}));
        assert_eq!(PruneConfig::from_value(&f.to_json()).unwrap(), f);
        let d = parse(r#"{"method":"divprune","keep":128}"#).unwrap();
        assert_eq!(d, PruneConfig::DivPrune(DivPruneConfig { keep: 128 }));
        assert!(d.selects_before_decoder() && !f.selects_before_decoder());
        assert_eq!(PruneConfig::from_value(&d.to_json()).unwrap(), d);
        assert_eq!(PruneConfig::paper_default().keep(), None);
        expect_err(r#"{"method":"divprune"}"#, 32, "divprune", "needs a budget");
        expect_err(
            r#"{"method":"divprune","keep":0}"#,
            32,
            "`keep` = 0",
            "divprune",
        );
        expect_err(
            r#"{"method":"divprune","keep":-3}"#,
            32,
            "`keep` = -3",
            "[1, image tokens",
        );
        expect_err(
            r#"{"method":"divprune","keep":6.5}"#,
            32,
            "`keep` = 6.5",
            "divprune",
        );
        expect_err(r#"{"method":"fastv","keep":0}"#, 32, "`keep` = 0", "fastv");
        expect_err(
            r#"{"method":"fastv","k":2,"ratio":0.5,"keep":64}"#,
            32,
            "fastv",
            "not both",
        );
        expect_err(
            r#"{"method":"divprune","keep":64,"k":2}"#,
            32,
            "`k`",
            "divprune",
        );
        expect_err(r#"{"mode":[],"keep":64}"#, 32, "`keep`", "visipruner");
    }

    #[test]
    fn budget_against_the_prompts_images() {
        let d = PruneConfig::DivPrune(DivPruneConfig { keep: 576 });
        d.check_budget(&[576]).unwrap();
        d.check_budget(&[]).unwrap();
        let err = d.check_budget(&[576, 575]).unwrap_err().to_string();
        assert!(
            err.contains("divprune") && err.contains("[1, 575]") && err.contains("per image"),
            "{err}"
        );
        let f = parse(r#"{"method":"fastv","keep":1000}"#).unwrap();
        // FastV ranks the prompt's image tokens together: its range is their sum.
        f.check_budget(&[576, 576]).unwrap();
        let err = f.check_budget(&[576]).unwrap_err().to_string();
        assert!(err.contains("fastv") && err.contains("[1, 576]"), "{err}");
        PruneConfig::paper_default().check_budget(&[1]).unwrap();
    }

    #[test]
    fn short_forms() {
        let p = |t: &str| PruneConfig::parse_arg(t);
        assert_eq!(p("none").unwrap(), PruneConfig::Dense);
        assert_eq!(p("dense").unwrap(), PruneConfig::Dense);
        assert_eq!(p("visipruner").unwrap(), PruneConfig::paper_default());
        assert_eq!(
            p("fastv").unwrap(),
            PruneConfig::FastV(FastVConfig {
                k: 2,
                ratio: 0.5,
                keep: None
            })
        );
        assert_eq!(p("fastv:128").unwrap().keep(), Some(128));
        assert_eq!(
            p("divprune:64").unwrap(),
            PruneConfig::DivPrune(DivPruneConfig { keep: 64 })
        );
        // The JSON form still works through the same entry.
        assert_eq!(
            p(r#"{"method":"fastv","k":3,"ratio":0.25}"#).unwrap(),
            PruneConfig::FastV(FastVConfig {
                k: 3,
                ratio: 0.25,
                keep: None
            })
        );
        let err = |t: &str| p(t).unwrap_err().to_string();
        for (text, needles) in [
            ("tome:64", &["\"tome\"", "divprune"][..]),
            ("divprune", &["divprune", "needs a budget"][..]),
            (
                "divprune:0",
                &["`keep` = \"0\"", "divprune", "[1, image tokens"][..],
            ),
            ("divprune:x", &["`keep` = \"x\"", "divprune"][..]),
            ("fastv:-1", &["`keep` = \"-1\"", "fastv"][..]),
            ("visipruner:64", &["visipruner", "adaptive"][..]),
            ("none:3", &["dense", "no budget"][..]),
        ] {
            let e = err(text);
            assert!(
                needles.iter().all(|n| e.contains(n)) && !e.contains('\n'),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn directly_built_configs_are_validated_too() {
        let cfg = PruneConfig::FastV(FastVConfig {
            k: 2,
            ratio: f64::NAN,
            keep: None,
        });
        let err = cfg.validate(32).unwrap_err().to_string();
        assert!(err.contains("ratio"), "{err}");
        let PruneConfig::VisiPruner(mut v) = PruneConfig::paper_default() else {
            unreachable!("paper default is visipruner")
        };
        v.layer_threshold = None;
        let err = PruneConfig::VisiPruner(v)
            .validate(32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer_threshold") && err.contains("required"),
            "{err}"
        );
    }
}
