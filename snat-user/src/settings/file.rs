//! `snat run --config FILE`: a TOML file whose keys are `snat run`'s long flags, expanded into
//! flags before the command line is parsed, so file values are checked exactly like flags.

use std::{ffi::OsString, path::Path};

/// A `--config` file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("--config {path}: not valid TOML: {message}")]
    Toml { path: String, message: String },
    #[error("--config {path}: unknown key {key:?}; keys are the long flags of `snat run` without the dashes, e.g. {known}")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
    #[error("--config {path}: key {key:?} must be a string, a number or a list of them")]
    BadValue { path: String, key: String },
}

/// Expands `snat run … --config FILE …`: every key of the TOML file that is not also given as a
/// flag becomes `--key value` (a list, the flag repeated), inserted right after `run`, so clap
/// validates file values exactly like flags and flags given on the command line win.
/// `known` lists the long flag names of `snat run`. Other command lines come back unchanged.
pub fn expand_config_file(
    argv: Vec<OsString>,
    known: &[String],
) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(run_at) = argv.iter().position(|a| a == "run") else {
        return Ok(argv);
    };
    let rest: Vec<String> = argv[run_at + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut path = None;
    for (i, a) in rest.iter().enumerate() {
        if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_owned());
        } else if a == "--config" {
            path = rest.get(i + 1).cloned();
        }
    }
    let Some(path) = path else { return Ok(argv) };
    let text =
        std::fs::read_to_string(Path::new(&path)).map_err(|source| ConfigFileError::Read {
            path: path.clone(),
            source,
        })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigFileError::Toml {
            path: path.clone(),
            message: e.message().to_owned(),
        })?;
    let given: Vec<&str> = rest
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a))
        .collect();
    let mut injected: Vec<OsString> = Vec::new();
    for (raw_key, value) in &table {
        let key = raw_key.replace('_', "-");
        if !known.contains(&key) || key == "config" {
            return Err(ConfigFileError::UnknownKey {
                path: path.clone(),
                key: raw_key.clone(),
                known: "iface, nat-ip, internal, port-range, udp-timeout".into(),
            });
        }
        if given.contains(&key.as_str()) {
            continue;
        }
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            _ => None,
        };
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<_>>(),
            other => scalar(other).map(|v| vec![v]),
        }
        .ok_or_else(|| ConfigFileError::BadValue {
            path: path.clone(),
            key: raw_key.clone(),
        })?;
        for v in values {
            injected.push(format!("--{key}").into());
            injected.push(v.into());
        }
    }
    let mut out = argv[..=run_at].to_vec();
    out.extend(injected);
    out.extend_from_slice(&argv[run_at + 1..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::settings::cli::{Cli, Command};

    fn known() -> Vec<String> {
        use clap::CommandFactory as _;
        Cli::command()
            .find_subcommand("run")
            .unwrap()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }

    fn expand(file: &str, line: &str) -> Result<Vec<String>, ConfigFileError> {
        let dir = std::env::temp_dir().join(format!(
            "snat-config-test-{}-{}",
            std::process::id(),
            line.len()
        ));
        std::fs::write(&dir, file).unwrap();
        let line = line.replace("FILE", dir.to_str().unwrap());
        let argv = line.split_whitespace().map(OsString::from).collect();
        let out = expand_config_file(argv, &known());
        let _ = std::fs::remove_file(&dir);
        out.map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn config_file_keys_become_flags_and_flags_win() {
        let file = "iface = \"up0\"\ninternal = [\"10.1.0.0/16\", \"10.2.0.0/16\"]\nport_range = \"40000:50000\"\nmax-mappings = 4096\n";
        let argv = expand(file, "snat run --config FILE --port-range 50000:60000").unwrap();
        let Command::Run(a) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!()
        };
        assert_eq!(a.iface, "up0");
        assert_eq!(a.internal.len(), 2);
        assert_eq!(
            a.port_range,
            "50000:60000".parse().unwrap(),
            "the flag wins over the file"
        );
        assert_eq!(a.max_mappings, 4096);
        // Other commands are left alone.
        assert_eq!(
            expand(file, "snat status --iface up0").unwrap(),
            ["snat", "status", "--iface", "up0"]
        );
    }

    #[test]
    fn config_file_errors_name_the_file_and_key() {
        let e = expand("colour = \"blue\"\n", "snat run --config FILE")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key \"colour\""), "{e}");
        let e = expand("iface = [\"a\", 1.5]\n", "snat run --config FILE")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key \"iface\" must be"), "{e}");
        let e = expand("iface = \n", "snat run --config FILE")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid TOML"), "{e}");
        // A bad value in the file is refused by the same parser as the flag.
        let argv = expand(
            "internal = \"10.1.2.3/8\"\n",
            "snat run --iface up0 --config FILE",
        )
        .unwrap();
        let e = Cli::try_parse_from(&argv).unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
    }

    #[test]
    fn both_families_from_the_file() {
        let file = "iface = \"up0\"\ninternal = [\"10.1.0.0/16\", \"fd00:10::/64\"]\nexclude = [\"fd00:96::/108\", \"10.96.0.0/12\"]\nnat-ip = [\"2001:db8::7\", \"203.0.113.1\"]\n";
        let argv = expand(file, "snat run --config FILE").unwrap();
        let Command::Run(a) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!()
        };
        fn joined<T: ToString>(v: &[T]) -> String {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        }
        assert_eq!(joined(&a.internal), "10.1.0.0/16 fd00:10::/64");
        assert_eq!(joined(&a.exclude), "fd00:96::/108 10.96.0.0/12");
        assert_eq!(joined(&a.nat_ips), "2001:db8::7 203.0.113.1");
        let iface = crate::settings::Interface {
            name: "up0".into(),
            index: 7,
            ipv4: vec![],
            ipv6: vec![],
        };
        let s = crate::settings::Settings::validate(&a, iface).unwrap();
        assert_eq!(
            s.nat_ips6,
            ["2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap()]
        );
        assert_eq!(s.exclude6.len(), 2);
        // A bad IPv6 value in the file is refused like the flag.
        let argv = expand(
            "internal = \"fd00:10::1/64\"\n",
            "snat run --iface up0 --config FILE",
        )
        .unwrap();
        let e = Cli::try_parse_from(&argv).unwrap_err().to_string();
        assert!(e.contains("did you mean fd00:10::/64"), "{e}");
    }

    #[test]
    fn per_port_udp_timeouts_from_the_file() {
        let run = |file: &str, line: &str| {
            let argv = expand(file, line).unwrap();
            match Cli::try_parse_from(&argv).map(|c| c.command) {
                Ok(Command::Run(a)) => Ok(a.udp_timeout_for),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        let file = "udp-timeout-for = [\"53=10s\", \"123=1m\"]\n";
        assert_eq!(
            run(file, "snat run --iface up0 --config FILE")
                .unwrap()
                .len(),
            2
        );
        // A flag replaces the file's list.
        assert_eq!(
            run(
                file,
                "snat run --iface up0 --config FILE --udp-timeout-for none"
            )
            .unwrap(),
            [crate::settings::udp_ports::PortTimeout::None]
        );
        let e = run(
            "udp_timeout_for = [\"5353=30s\"]\n",
            "snat run --iface up0 --config FILE",
        )
        .unwrap_err();
        assert!(
            e.contains("--udp-timeout-for") && e.contains("port 5353 is not a well-known port"),
            "{e}"
        );
    }
}
