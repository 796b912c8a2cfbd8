//! Turning file, environment and flags into one [`BrokerConfig`]:
//! flags win over environment, environment over file, file over defaults.

use std::path::{Path, PathBuf};

use starling_model::config::BrokerConfig;
use thiserror::Error;

/// The environment prefix for `STARLING_<SECTION>_<KEY>` overrides.
pub const ENV_PREFIX: &str = "STARLING_";

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration{origin}: {source}")]
    Invalid {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Value(#[from] starling_model::config::InvalidSetting),
}

/// Settings given on the command line (they override everything else).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub recover_store: bool,
    pub auth_bundle: Option<PathBuf>,
    pub self_signed: bool,
}

/// Loads the effective configuration from `overrides.config` (if any), the
/// given environment (`(name, value)` pairs, normally `std::env::vars()`) and
/// the flags.
pub fn load(
    overrides: &Overrides,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BrokerConfig, SettingsError> {
    let mut table = match &overrides.config {
        Some(path) => read_table(path)?,
        None => toml::Table::new(),
    };
    let known = section_types();
    let mut applied = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        // Other STARLING_* variables (STARLING_CONFIG, test harness variables…)
        // are not config keys: only known sections are taken.
        let Some(defaults) = known.get(&section).and_then(|v| v.as_table()) else {
            continue;
        };
        let value = typed_env_value(defaults.get(&key), &value);
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(t) = entry.as_table_mut() {
            t.insert(key, value);
            applied.push(name);
        }
    }
    let mut config: BrokerConfig = table.try_into().map_err(|source| SettingsError::Invalid {
        origin: match (&overrides.config, applied.is_empty()) {
            (Some(p), true) => format!(" in {}", p.display()),
            (Some(p), false) => {
                format!(
                    " in {} or environment ({})",
                    p.display(),
                    applied.join(", ")
                )
            }
            (None, false) => format!(" in environment ({})", applied.join(", ")),
            (None, true) => String::new(),
        },
        source: Box::new(source),
    })?;
    if let Some(d) = &overrides.data_dir {
        config.storage.data_dir = Some(d.clone());
    }
    if overrides.recover_store {
        config.storage.recover = true;
    }
    if let Some(b) = &overrides.auth_bundle {
        config.auth.bundle = Some(b.clone());
    }
    if overrides.self_signed {
        config.tls.self_signed = true;
    }
    config.validate()?;
    Ok(config.with_default_binds())
}

fn read_table(path: &Path) -> Result<toml::Table, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|source| SettingsError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
}

/// The default config as a TOML table: tells which sections exist and what
/// type each key has, so `STARLING_LIMITS_MAX_CONNECTIONS=10` becomes an
/// integer and `STARLING_BROKER_NAME=123` stays a string.
fn section_types() -> toml::Table {
    let mut t =
        toml::Table::try_from(BrokerConfig::default().with_default_binds()).unwrap_or_default();
    // Sections whose every field is optional serialize as empty or absent.
    for s in ["tls", "topics", "auth", "storage"] {
        t.entry(s.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    t
}

fn typed_env_value(default: Option<&toml::Value>, raw: &str) -> toml::Value {
    match default {
        Some(toml::Value::Integer(_)) => raw
            .parse()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.into())),
        Some(toml::Value::Boolean(_)) => raw
            .parse()
            .map(toml::Value::Boolean)
            .unwrap_or_else(|_| toml::Value::String(raw.into())),
        Some(_) => toml::Value::String(raw.into()),
        // Optional keys (absent from the defaults): guess from the text.
        None => {
            if let Ok(i) = raw.parse() {
                toml::Value::Integer(i)
            } else if let Ok(b) = raw.parse() {
                toml::Value::Boolean(b)
            } else {
                toml::Value::String(raw.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_model::config::{Anonymous, Enabled};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_anything() {
        let c = load(&Overrides::default(), env(&[])).unwrap();
        assert_eq!(c.mqtt.bind, "127.0.0.1:1883");
        assert_eq!(c.http.bind, "127.0.0.1:1884");
        assert_eq!(c.admin.bind, "127.0.0.1:8081");
        assert_eq!(c.auth.anonymous, Anonymous::Loopback);
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[mqtt]\nbind = \"127.0.0.1:1\"\n[limits]\nmax_keepalive = 5\n[broker]\nname=\"x\"\n",
        )
        .unwrap();
        let o = Overrides {
            config: Some(path),
            auth_bundle: Some("flag.json".into()),
            ..Default::default()
        };
        let c = load(
            &o,
            env(&[
                ("STARLING_MQTT_BIND", "127.0.0.1:2"),
                ("STARLING_LIMITS_MAX_CONNECTIONS", "7"),
                ("STARLING_BROKER_NAME", "123"),
                ("STARLING_AUTH_BUNDLE", "env.json"),
                ("STARLING_TOPICS_MAX_LENGTH", "64"),
                ("STARLING_MQTTS_ENABLED", "off"),
                ("STARLING_BIN", "/ignored"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.mqtt.bind, "127.0.0.1:2");
        assert_eq!(c.limits.max_keepalive, 5);
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(c.broker.name, "123");
        assert_eq!(c.auth.bundle.as_deref(), Some(Path::new("flag.json")));
        assert_eq!(c.topics.max_length, Some(64));
        assert_eq!(c.mqtts.enabled, Enabled::Off);
    }

    #[test]
    fn bad_values_are_reported_with_their_origin() {
        let err = load(
            &Overrides::default(),
            env(&[("STARLING_LIMITS_MAX_CONNECTIONS", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("STARLING_LIMITS_MAX_CONNECTIONS"), "{err}");
        let err = load(&Overrides::default(), env(&[("STARLING_LIMITS_NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
