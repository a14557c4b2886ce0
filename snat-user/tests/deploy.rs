//! The Kubernetes manifests in `deploy/kubernetes/` cannot be applied on this machine (no
//! cluster); this test parses them and checks every field the agent relies on, and that the
//! agent's own parser accepts the command line, config file and plan they carry.

use std::{ffi::OsString, path::PathBuf};

use clap::{CommandFactory as _, Parser as _};
use serde_yaml::Value;
use snat_user::settings::{
    cli::{Cli, Command},
    file::expand_config_file,
    plan::Plan,
};

fn docs() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/snat.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/kubernetes/snat.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .collect()
}

use serde::Deserialize as _;

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifests"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_daemonset_runs_snat_on_its_plan_slice_with_only_the_capabilities_it_needs() {
    let docs = docs();
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "snat attaches to the node's uplink"
    );
    let agent = &pod["containers"][0];
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut add = strs(&sc["capabilities"]["add"]);
    add.sort();
    assert_eq!(
        add,
        ["BPF", "NET_ADMIN", "PERFMON"],
        "tests/tests/cli.rs runs the agent with exactly these"
    );

    let args = strs(&agent["args"]);
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    assert_eq!(arg("--plan").as_deref(), Some("/etc/snat/plan.json"));
    assert_eq!(
        arg("--node-index-file").as_deref(),
        Some("/run/snat/node-index")
    );
    assert_eq!(arg("--config").as_deref(), Some("/etc/snat/snat.toml"));
    let port = agent["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(arg("--metrics-addr"), Some(format!("0.0.0.0:{port}")));

    let mounts = |c: &Value| -> Vec<(String, String)> {
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_owned(),
                    m["mountPath"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert!(mounts(agent).contains(&("config".into(), "/etc/snat".into())));
    // Pinned state lives on the host's BPF file system, so it outlives the container.
    assert!(mounts(agent).contains(&("bpffs".into(), "/sys/fs/bpf".into())));
    assert!(
        args.contains(&"--keep-state".to_owned()),
        "rolling updates keep connections"
    );
    assert!(mounts(agent).contains(&("run-snat".into(), "/run/snat".into())));
    let init = &pod["initContainers"][0];
    assert!(mounts(init).contains(&("run-snat".into(), "/run/snat".into())));
    let script = strs(&init["command"]).join(" ");
    assert!(
        script.contains("snat\\.io/node-index") && script.contains("> /run/snat/node-index"),
        "{script}"
    );
    assert_eq!(
        init["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let term = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0];
    assert_eq!(term["matchExpressions"][0]["key"], "snat.io/node-index");
    let volumes = pod["volumes"].as_sequence().unwrap();
    assert!(volumes
        .iter()
        .any(|v| v["name"] == "config" && v["configMap"]["name"] == "snat"));
    assert!(volumes
        .iter()
        .any(|v| v["name"] == "bpffs" && v["hostPath"]["path"] == "/sys/fs/bpf"));

    // The agent's own parser accepts the container's command line with the ConfigMap's files.
    let cm = find(&docs, "ConfigMap");
    let dir = std::env::temp_dir().join(format!("snat-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for key in ["snat.toml", "plan.json"] {
        std::fs::write(dir.join(key), cm["data"][key].as_str().unwrap()).unwrap();
    }
    std::fs::write(dir.join("node-index"), "2\n").unwrap();
    let argv: Vec<OsString> = std::iter::once("snat".to_owned())
        .chain(args.iter().map(|a| {
            a.replace("/etc/snat/", &format!("{}/", dir.display()))
                .replace("/run/snat/", &format!("{}/", dir.display()))
        }))
        .map(OsString::from)
        .collect();
    let known: Vec<String> = Cli::command()
        .find_subcommand("run")
        .unwrap()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let argv = expand_config_file(argv, &known).expect("the ConfigMap's snat.toml");
    let Command::Run(run) = Cli::try_parse_from(&argv)
        .expect("the container's args")
        .command
    else {
        panic!("not `snat run`")
    };
    assert_eq!(run.iface, "eth0");
    assert!(!run.internal.is_empty());
    let plan = Plan::load(run.plan.as_ref().unwrap()).expect("the ConfigMap's plan.json");
    assert!(plan.slice(plan.nodes + plan.surge - 1).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rbac_lets_the_init_container_read_nodes_and_nothing_else() {
    let docs = docs();
    let role = find(&docs, "ClusterRole");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(strs(&rules[0]["resources"]), ["nodes"]);
    assert_eq!(strs(&rules[0]["verbs"]), ["get"]);
    let binding = find(&docs, "ClusterRoleBinding");
    let ds = find(&docs, "DaemonSet");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["name"],
        ds["spec"]["template"]["spec"]["serviceAccountName"]
    );
    assert_eq!(
        binding["subjects"][0]["namespace"],
        ds["metadata"]["namespace"]
    );
}
