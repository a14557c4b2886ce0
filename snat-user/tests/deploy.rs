//! The Kubernetes manifests in `deploy/kubernetes/` cannot be applied on this machine (no
//! cluster); this test parses them and checks every field the agent relies on, and that the
//! agent's own parser accepts the command line, config file and plan they carry: `snat.yaml`
//! (fixed slices of a plan) and `snat-cluster.yaml` (cluster mode: the agents and the gateway).

use std::{ffi::OsString, path::PathBuf};

use clap::{CommandFactory as _, Parser as _};
use serde_yaml::Value;
use snat_user::settings::{
    cli::{Cli, Command},
    cluster::{Cluster, GatewaySettings},
    file::expand_config_file,
    plan::Plan,
    MetricsAddr,
};

fn docs_of(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .collect()
}

fn docs() -> Vec<Value> {
    docs_of("snat.yaml")
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

/// The object of `kind` called `name`.
fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

fn mounts(c: &Value) -> Vec<(String, String)> {
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
}

/// The value after `flag` in `args`.
fn arg_of(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Endpoints as the Secret's `endpoints` key would hold them.
const ENDPOINTS: &str = "https://10.0.0.5:2379,https://10.0.0.6:2379,https://10.0.0.7:2379";

/// Checks what cluster mode's containers (agent and gateway) share: hostNetwork, the node name
/// from the downward API, the endpoints from the Secret `snat-etcd`, the TLS files from the same
/// Secret mounted where the flags look, and only the agent's capabilities. Returns the args with
/// Kubernetes' `$(VAR)` references expanded (the node `node-1`, [`ENDPOINTS`]) and the files
/// moved under `dir` (with stand-ins for the Secret's files), for the agent's own parser.
fn cluster_container(ds: &Value, dir: &std::path::Path) -> Vec<String> {
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "{:?}", ds["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = &pod["containers"][0];
    let env = |name: &str| -> &Value {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))
    };
    assert_eq!(
        env("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let secret = &env("ETCD_ENDPOINTS")["valueFrom"]["secretKeyRef"];
    assert_eq!(secret["name"], "snat-etcd");
    assert_eq!(secret["key"], "endpoints");
    let args = strs(&c["args"]);
    assert_eq!(
        arg_of(&args, "--etcd-endpoints").as_deref(),
        Some("$(ETCD_ENDPOINTS)")
    );

    // The TLS files are the Secret's, where it is mounted.
    let mount = mounts(c)
        .into_iter()
        .find(|(name, _)| name == "etcd-client")
        .expect("the etcd-client Secret mounted")
        .1;
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "etcd-client")
        .expect("the etcd-client volume");
    assert_eq!(volume["secret"]["secretName"], "snat-etcd");
    let items: Vec<String> = volume["secret"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap().to_owned())
        .collect();
    for flag in ["--etcd-ca", "--etcd-cert", "--etcd-key"] {
        let file = arg_of(&args, flag).unwrap_or_else(|| panic!("no {flag}"));
        let (at, name) = file.rsplit_once('/').unwrap();
        assert_eq!(at, mount, "{flag} {file}");
        assert!(items.iter().any(|i| i == name), "{flag} {file}: {items:?}");
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut add = strs(&sc["capabilities"]["add"]);
    add.sort();
    assert_eq!(add, ["BPF", "NET_ADMIN", "PERFMON"]);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        arg_of(&args, "--metrics-addr"),
        Some(format!("0.0.0.0:{port}"))
    );

    // Stand-ins for the Secret's files, and the args as Kubernetes expands them.
    let files = dir.join(mount.trim_start_matches("/etc/snat/"));
    std::fs::create_dir_all(&files).unwrap();
    for i in &items {
        std::fs::write(files.join(i), "stand-in for the Secret's PEM\n").unwrap();
    }
    args.iter()
        .map(|a| {
            a.replace("$(NODE_NAME)", "node-1")
                .replace("$(ETCD_ENDPOINTS)", ENDPOINTS)
                .replace("/etc/snat/", &format!("{}/", dir.display()))
        })
        .collect()
}

fn parse(args: Vec<String>) -> Command {
    let argv: Vec<OsString> = std::iter::once("snat".to_owned())
        .chain(args)
        .map(OsString::from)
        .collect();
    let known: Vec<String> = Cli::command()
        .find_subcommand("run")
        .unwrap()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let argv = expand_config_file(argv, &known).expect("the ConfigMap's snat.toml");
    Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("the container's args {argv:?}: {e}"))
        .command
}

#[test]
fn the_cluster_daemonset_names_each_node_from_the_downward_api_and_reaches_etcd_through_a_secret() {
    let docs = docs_of("snat-cluster.yaml");
    let ds = named(&docs, "DaemonSet", "snat-cluster");
    let dir = std::env::temp_dir().join(format!("snat-deploy-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cm = named(&docs, "ConfigMap", "snat-cluster");
    std::fs::write(
        dir.join("snat.toml"),
        cm["data"]["snat.toml"].as_str().unwrap(),
    )
    .unwrap();
    let args = cluster_container(ds, &dir);
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--keep-state".to_owned()));
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(mounts(c).contains(&("bpffs".into(), "/sys/fs/bpf".into())));
    assert!(mounts(c).contains(&("config".into(), "/etc/snat".into())));

    let Command::Run(run) = parse(args) else {
        panic!("not `snat run`")
    };
    assert_eq!(run.iface, "eth0");
    assert!(run.plan.is_none(), "cluster mode, not a plan");
    let cluster = Cluster::validate(&run.cluster)
        .expect("valid cluster flags")
        .expect("cluster mode");
    assert_eq!(cluster.node_name, "node-1");
    assert_eq!(cluster.endpoints.len(), 3);
    assert!(cluster.tls.is_some(), "TLS to etcd");
    assert!(!run.nat_ips.is_empty(), "the shared NAT IPs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_gateway_runs_on_labelled_nodes_under_their_name_with_the_same_secret() {
    let docs = docs_of("snat-cluster.yaml");
    let ds = named(&docs, "DaemonSet", "snat-gateway");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["snat.io/gateway"], "true");
    let dir = std::env::temp_dir().join(format!("snat-deploy-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let args = cluster_container(ds, &dir);
    assert_eq!(arg_of(&args, "--name").as_deref(), Some("node-1"));
    let Command::Gateway(a) = parse(args) else {
        panic!("not `snat gateway`")
    };
    let g = GatewaySettings::validate(&a).expect("valid gateway flags");
    assert_eq!(g.name, "node-1");
    assert_eq!(g.endpoints.len(), 3);
    assert!(g.tls.is_some());
    assert_eq!(
        g.metrics_addr,
        "0.0.0.0:9470".parse::<MetricsAddr>().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
