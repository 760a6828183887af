//! A part's settings file and what can be wrong with its settings, said the same way by every part.
//!
//! Each part (`ca`, `agent`, `proxy`) takes every setting from a flag, a `MESHWARD_<PART>_*`
//! environment variable or its TOML file, whose keys are the setting names. So an error can always
//! say all three places a missing setting can come from.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a part's configuration is unusable. The CLI prints it on one line and exits 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting was given nowhere.
    #[error("`{setting}` is required: pass `--{flag}`, set `{env}`, or put `{setting}` in the config file", flag = flag_name(setting), env = env_name(part, setting))]
    Missing {
        /// The part whose setting it is (`ca`, `agent`, `proxy`): it names the env variable.
        part: &'static str,
        /// The setting's name (`trust_domain`).
        setting: &'static str,
    },
    /// A setting's value does not parse or is out of range.
    #[error("invalid `{setting}` `{value}`: {reason}")]
    Invalid {
        /// The setting's name.
        setting: &'static str,
        /// The value as given (never a secret).
        value: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// Settings that each parse but cannot go together (two identity sources, two listeners on
    /// one address); the message names both and what to do.
    #[error("{0}")]
    Conflict(String),
    /// The config file could not be read.
    #[error("cannot read config file `{}`: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("config file `{}` is invalid: {message}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, on one line.
        message: String,
    },
}

/// Reads and parses the TOML config file at `path` into settings `T`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses a TOML config file's `text` into settings `T`; `path` is only for the error message.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::ParseFile {
        path: path.to_path_buf(),
        // toml's messages span several lines with a source excerpt; keep the message, on one line.
        message: e.message().trim().replace('\n', " "),
    })
}

/// The flag of a setting: `trust_domain` -> `trust-domain`.
pub fn flag_name(setting: &str) -> String {
    setting.replace('_', "-")
}

/// The environment variable of a part's setting: (`ca`, `trust_domain`) ->
/// `MESHWARD_CA_TRUST_DOMAIN`.
pub fn env_name(part: &str, setting: &str) -> String {
    format!(
        "MESHWARD_{}_{}",
        part.to_ascii_uppercase(),
        setting.to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        listen: Option<String>,
    }

    #[test]
    fn missing_names_the_flag_the_env_and_the_file_key() {
        let err = ConfigError::Missing {
            part: "ca",
            setting: "trust_domain",
        };
        assert_eq!(
            err.to_string(),
            "`trust_domain` is required: pass `--trust-domain`, set `MESHWARD_CA_TRUST_DOMAIN`, \
             or put `trust_domain` in the config file"
        );
    }

    #[test]
    fn a_file_is_read_and_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\n").unwrap();
        let settings: Settings = read_toml(&path).unwrap();
        assert_eq!(settings.listen.as_deref(), Some("127.0.0.1:1"));
    }

    #[test]
    fn an_unknown_key_is_refused_on_one_line_naming_the_file_and_the_key() {
        let path = Path::new("/etc/meshward/part.toml");
        let err = parse_toml::<Settings>("listen = \"a\"\nlisen = \"b\"\n", path).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
        assert!(
            text.starts_with("config file `/etc/meshward/part.toml` is invalid: "),
            "{text}"
        );
        assert!(text.contains("lisen"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let err = read_toml::<Settings>(&path).unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }
}
