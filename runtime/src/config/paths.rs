//! Relative paths in a config file resolve against the file's own folder,
//! so `ganglion --config /srv/gw/ganglion.toml run` finds `plugins/`
//! beside that file whatever the working directory is. A config file
//! named without a folder (the default `ganglion.toml`) has the working
//! directory as its folder, so nothing changes for it.
//!
//! Resolved: `[plugins] dir, cache_dir`, `[state] path`, `[rules] dir,
//! extra_dirs`, `[audit] path`, `[model] path, embedding`, `[broker]
//! users_file`, `[mqtt] ca_file, cert_file, key_file, password_file`.
//! Not here: paths inside rule files (`grants` directories), which rules
//! give for themselves, and command-line options, which are relative to the
//! working directory as usual.

use super::GanglionConfig;
use std::path::{Path, PathBuf};

fn rebase(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

fn rebase_opt(base: &Path, path: &mut Option<PathBuf>) {
    if let Some(p) = path {
        rebase(base, p);
    }
}

/// For the `[mqtt]` files, kept as strings (as `--ca-file` gives them).
fn rebase_str(base: &Path, path: &mut Option<String>) {
    if let Some(p) = path
        && Path::new(p.as_str()).is_relative()
    {
        *p = base.join(p.as_str()).to_string_lossy().into_owned();
    }
}

impl GanglionConfig {
    /// Makes every relative path of the configuration relative to `base`
    /// (the config file's folder; see the module's documentation for which
    /// paths). An empty `base` changes nothing. [`GanglionConfig::load`]
    /// calls it with the file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        if base.as_os_str().is_empty() {
            return;
        }
        rebase(base, &mut self.plugins.dir);
        rebase_opt(base, &mut self.plugins.cache_dir);
        rebase(base, &mut self.state.path);
        rebase(base, &mut self.rules.dir);
        for dir in &mut self.rules.extra_dirs {
            rebase(base, dir);
        }
        rebase(base, &mut self.audit.path);
        rebase_opt(base, &mut self.model.path);
        rebase_opt(base, &mut self.model.embedding);
        rebase_opt(base, &mut self.broker.users_file);
        rebase_str(base, &mut self.mqtt.ca_file);
        rebase_str(base, &mut self.mqtt.cert_file);
        rebase_str(base, &mut self.mqtt.key_file);
        rebase_opt(base, &mut self.mqtt.password_file);
        for remote in self.remote.values_mut() {
            rebase_opt(base, &mut remote.api_key_file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_config_folder_and_absolute_ones_stay() {
        let text = r#"
[plugins]
dir = "plugins"
cache_dir = "/var/cache/ganglion"
[state]
path = "state/state.redb"
[rules]
dir = "rules"
extra_dirs = ["packs/a", "/opt/b"]
[audit]
path = "audit.jsonl"
[model]
path = "models/m.gguf"
[broker]
users_file = "users"
[mqtt]
ca_file = "tls/ca.pem"
cert_file = "/etc/tls/client.pem"
key_file = "tls/client.key"
password_file = "secret"
"#;
        let mut c = GanglionConfig::parse(text).unwrap();
        c.resolve_paths(Path::new("/srv/gw"));
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(c.plugins.dir, p("/srv/gw/plugins"));
        assert_eq!(c.plugins.cache_dir, Some(p("/var/cache/ganglion")));
        assert_eq!(c.state.path, p("/srv/gw/state/state.redb"));
        assert_eq!(c.rules.dir, p("/srv/gw/rules"));
        assert_eq!(c.rules.extra_dirs, [p("/srv/gw/packs/a"), p("/opt/b")]);
        assert_eq!(c.audit.path, p("/srv/gw/audit.jsonl"));
        assert_eq!(c.model.path, Some(p("/srv/gw/models/m.gguf")));
        assert_eq!(c.model.embedding, None);
        assert_eq!(c.broker.users_file, Some(p("/srv/gw/users")));
        assert_eq!(c.mqtt.ca_file.as_deref(), Some("/srv/gw/tls/ca.pem"));
        assert_eq!(c.mqtt.cert_file.as_deref(), Some("/etc/tls/client.pem"));
        assert_eq!(c.mqtt.key_file.as_deref(), Some("/srv/gw/tls/client.key"));
        assert_eq!(c.mqtt.password_file, Some(p("/srv/gw/secret")));
        // Defaults are relative too, and move with the file.
        let mut d = GanglionConfig::default();
        d.resolve_paths(Path::new("/srv/gw"));
        assert_eq!(d.state.path, p("/srv/gw/.ganglion/state.redb"));
        // A file in the working directory keeps its paths as they are.
        let mut same = GanglionConfig::parse(text).unwrap();
        same.resolve_paths(Path::new(""));
        assert_eq!(same, GanglionConfig::parse(text).unwrap());
    }

    #[test]
    fn load_resolves_against_the_file_folder() {
        let dir = std::env::temp_dir().join(format!("ganglion-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ganglion.toml");
        std::fs::write(&file, "[rules]\ndir = \"my-rules\"\n").unwrap();
        let c = GanglionConfig::load(&file).unwrap();
        assert_eq!(c.rules.dir, dir.join("my-rules"));
        assert_eq!(c.plugins.dir, dir.join("plugins"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_password_source_and_errors_never_show_the_secret() {
        use crate::config::{MqttSettings, PasswordError};
        let dir = std::env::temp_dir().join(format!("ganglion-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret-file\r\n").unwrap();
        let from_file = MqttSettings {
            password_file: Some(file.clone()),
            ..MqttSettings::default()
        };
        assert_eq!(
            from_file.password().unwrap().as_deref(),
            Some("s3cret-file")
        );
        let both = MqttSettings {
            password: Some("inline".into()),
            ..from_file.clone()
        };
        assert_eq!(both.password(), Err(PasswordError::Several));
        let missing = MqttSettings {
            password_file: Some(dir.join("absent")),
            ..MqttSettings::default()
        };
        let err = missing.password().unwrap_err().to_string();
        assert!(
            err.contains("password_file") && err.contains("absent"),
            "{err}"
        );
        let env = MqttSettings {
            password_env: Some("GANGLION_TEST_SURELY_UNSET_VAR".into()),
            ..MqttSettings::default()
        };
        let err = env.password().unwrap_err().to_string();
        assert!(err.contains("GANGLION_TEST_SURELY_UNSET_VAR"), "{err}");
        assert_eq!(MqttSettings::default().password(), Ok(None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
