//! The Kubernetes manifests of workflows/k8s/, without a cluster (none can run here):
//! - every manifest passes the schemas of a pinned Kubernetes version (PyPI kubernetes-validate,
//!   strict: unknown fields are errors), and the validator does reject a broken one;
//! - each Job's container command, arguments and environment (ConfigMap, Secret, completion
//!   index, rendezvous variables) run as its pods would: one process per completion index, in
//!   the order the flow applies them, against a real S3 server (moto), to a finished dataset,
//!   SAE and features folder. Only what needs the cluster is replaced: the rendezvous host's DNS
//!   name (pod 0 behind the headless Service) by 127.0.0.1, and its port by a free one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{dataset_rows, free_port, stderr, stdout, venv_bin, S3Objects, S3Server};

const SAE: &str = env!("CARGO_BIN_EXE_sae");
/// The Kubernetes version the manifests are checked against (Debian 12's era of clusters up to
/// the newest GA features they use: podFailurePolicy, Indexed Jobs).
const KUBERNETES_VERSION: &str = "1.33.0";

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("workflows/k8s")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(file: &Path) -> Output {
    Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .expect("kubernetes-validate not found: run `make setup-test`")
}

#[test]
fn every_manifest_passes_the_pinned_kubernetes_schemas() {
    let files = manifest_files();
    assert!(files.len() >= 5, "{files:?}");
    for file in &files {
        let out = validate(file);
        assert!(out.status.success(), "{}: {}{}", file.display(), stdout(&out), stderr(&out));
    }
    // The validator is live: a misspelt field in a copy is an error.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(k8s_dir().join("capture-job.yaml")).unwrap();
    assert!(text.contains("completionMode: Indexed"));
    std::fs::write(&broken, text.replace("completionMode: Indexed", "completionMod: Indexed")).unwrap();
    assert!(!validate(&broken).status.success(), "kubernetes-validate accepted an unknown field");
}

/// Every document of a YAML file, as JSON (PyYAML from the test venv does the parsing).
fn documents(file: &Path) -> Vec<Value> {
    let out = Command::new(venv_bin("python3"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in {docs:?}"))
}

/// What the cluster would hold: the ConfigMap (as the user edited it) and the Secret.
struct Cluster {
    config: BTreeMap<String, String>,
    secret: BTreeMap<String, String>,
}

/// A Job's pod template, turned into processes.
struct JobSpec {
    name: String,
    completions: usize,
    command: Vec<String>,
    /// The container's environment, by completion index.
    env: Vec<Vec<(String, String)>>,
    container: Value,
    pod: Value,
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_string()
}

impl Cluster {
    /// One Job of a manifest, resolved as the kubelet would resolve its single container.
    fn job(&self, file: &str) -> (JobSpec, Vec<Value>) {
        let docs = documents(&k8s_dir().join(file));
        let job = find(&docs, "Job").clone();
        let spec = &job["spec"];
        let completions = spec["completions"].as_u64().unwrap_or(1) as usize;
        assert_eq!(
            spec["parallelism"].as_u64().unwrap_or(1) as usize,
            completions,
            "{file}: all pods must run at once"
        );
        let pod = spec["template"]["spec"].clone();
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{file}");
        let container = containers[0].clone();
        let command: Vec<String> = container["command"]
            .as_array()
            .unwrap()
            .iter()
            .chain(container["args"].as_array().unwrap())
            .map(str_of)
            .collect();
        let indexed = spec["completionMode"] == "Indexed";
        let env = (0..completions).map(|index| self.container_env(&container, indexed.then_some(index))).collect();
        (JobSpec { name: str_of(&job["metadata"]["name"]), completions, command, env, container, pod }, docs)
    }

    fn container_env(&self, container: &Value, index: Option<usize>) -> Vec<(String, String)> {
        let mut env = Vec::new();
        // Kubernetes sets JOB_COMPLETION_INDEX in every pod of an Indexed Job.
        if let Some(i) = index {
            env.push(("JOB_COMPLETION_INDEX".to_string(), i.to_string()));
        }
        for source in container["envFrom"].as_array().into_iter().flatten() {
            assert_eq!(source["configMapRef"]["name"], "sae-config", "{source}");
            env.extend(self.config.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let name = str_of(&var["name"]);
            let value = if let Some(v) = var.get("value") {
                str_of(v)
            } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
                assert_eq!(r["name"], "sae-s3", "{var}");
                self.secret[&str_of(&r["key"])].clone()
            } else if let Some(r) = var["valueFrom"].get("configMapKeyRef") {
                assert_eq!(r["name"], "sae-config", "{var}");
                self.config[&str_of(&r["key"])].clone()
            } else if let Some(r) = var["valueFrom"].get("fieldRef") {
                assert_eq!(r["fieldPath"], "metadata.annotations['batch.kubernetes.io/job-completion-index']", "{var}");
                index.expect("a completion index outside an Indexed Job").to_string()
            } else {
                panic!("an env source this test does not resolve: {var}")
            };
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
        }
        env
    }
}

fn env_value(env: &[(String, String)], name: &str) -> String {
    env.iter().rev().find(|(k, _)| k == name).unwrap_or_else(|| panic!("no {name} in {env:?}")).1.clone()
}

/// Runs one process per completion index, as the pods would run (a clean environment with the
/// image's PATH: the sae binary and the venv's torchrun), all at once; returns their outputs.
fn run_job(job: &JobSpec, replace: &[(&str, String)]) -> Vec<Output> {
    let sae_dir = Path::new(SAE).parent().unwrap();
    let path = format!(
        "{}:{}:/usr/local/bin:/usr/bin:/bin",
        sae_dir.display(),
        venv_bin("python3").parent().unwrap().display()
    );
    let children: Vec<Child> = job
        .env
        .iter()
        .map(|env| {
            let mut cmd = Command::new(&job.command[0]);
            cmd.args(&job.command[1..]).env_clear().env("PATH", &path).env("HOME", std::env::var("HOME").unwrap());
            for (k, v) in env {
                let v = replace.iter().find(|(name, _)| name == k).map_or(v.clone(), |(_, with)| with.clone());
                cmd.env(k, v);
            }
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (index, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "job {} index {index} failed:\n{}{}", job.name, stdout(out), stderr(out));
    }
    outputs
}

/// The ConfigMap as a user would edit it: the URLs (`[dataset, sae, features]`), the S3
/// endpoint, and (for 2 cores) small sizes; the Secret with moto's keys.
fn edited_cluster(s3: &S3Server, [data, sae, features]: [&str; 3], capture_tokens: usize) -> Cluster {
    let mut config: BTreeMap<String, String> = BTreeMap::new();
    let config_docs = documents(&k8s_dir().join("config.yaml"));
    for (k, v) in find(&config_docs, "ConfigMap")["data"].as_object().unwrap() {
        config.insert(k.clone(), str_of(v));
    }
    for key in [
        "DATASET_URL",
        "SAE_URL",
        "FEATURES_URL",
        "HOOK",
        "CAPTURE_TOKENS",
        "CAPTURE_ARGS",
        "TRAIN_ARGS",
        "FEATURES_ARGS",
    ] {
        assert!(config.contains_key(key), "config.yaml has no {key}");
    }
    let edits = [
        ("DATASET_URL", data.to_string()),
        ("SAE_URL", sae.to_string()),
        ("FEATURES_URL", features.to_string()),
        ("AWS_ENDPOINT", s3.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("CAPTURE_TOKENS", capture_tokens.to_string()),
        ("CAPTURE_ARGS", "--context-len 64 --batch-size 4 --threads 1".to_string()),
        ("TRAIN_ARGS", "--arch topk --latents 1152 --k 16 --batch-size 256 --max-tokens 4096 --threads 1 --eval-tokens 256 --density-tokens 2048 --json --dist-timeout 60".to_string()),
        ("FEATURES_ARGS", "--top-k 5 --quantile-bands 2 --samples-per-band 2 --threads 2".to_string()),
    ];
    config.extend(edits.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let secret = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Cluster { config, secret }
}

#[test]
fn the_manifests_commands_run_as_their_pods_would() {
    let s3 = S3Server::moto("k8s");
    let (data, sae, features) = ("s3://k8s/acts", "s3://k8s/run/sae", "s3://k8s/run/features");
    let capture_tokens = 2048;

    let cluster = edited_cluster(&s3, [data, sae, features], capture_tokens);

    // Capture: one worker per index; the worker count the pods are told is the Job's size.
    let (capture, _) = cluster.job("capture-job.yaml");
    assert!(capture.completions >= 2, "the capture Job should fan out");
    assert_eq!(
        env_value(&capture.env[0], "SAE_WORKERS"),
        capture.completions.to_string(),
        "SAE_WORKERS must equal completions"
    );
    assert_eq!(capture.container["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(capture.pod["restartPolicy"], "Never");
    run_job(&capture, &[]);
    assert!(s3.object(data, "manifest.json").is_none(), "the dataset is final before finalize ran");

    let (finalize, _) = cluster.job("finalize-job.yaml");
    assert_eq!(
        env_value(&finalize.env[0], "SAE_WORKERS"),
        capture.completions.to_string(),
        "finalize must know the capture's worker count"
    );
    run_job(&finalize, &[]);
    let (rows, _) = dataset_rows(data, "blocks.15.hook_resid_post", &s3.store_options());
    assert_eq!(rows.len(), capture_tokens, "the finalized dataset's rows");

    // Training: NNODES pods of GPUS_PER_POD ranks, meeting at pod 0 behind the headless Service.
    let (train, docs) = cluster.job("train.yaml");
    let service = find(&docs, "Service");
    assert_eq!(service["spec"]["clusterIP"], "None", "the rendezvous Service must be headless");
    assert_eq!(
        train.pod["subdomain"], service["metadata"]["name"],
        "pods are named under the Service only with subdomain = its name"
    );
    assert_eq!(service["spec"]["selector"]["batch.kubernetes.io/job-name"], Value::String(train.name.clone()));
    let env = &train.env[0];
    assert_eq!(env_value(env, "NNODES"), train.completions.to_string(), "NNODES must equal completions");
    assert_eq!(
        env_value(env, "GPUS_PER_POD"),
        train.container["resources"]["limits"]["nvidia.com/gpu"].to_string(),
        "one rank per GPU"
    );
    assert_eq!(
        env_value(env, "MASTER_ADDR"),
        format!("{}-0.{}", train.name, service["metadata"]["name"].as_str().unwrap()),
        "rank 0's DNS name"
    );
    assert_eq!(env_value(env, "MASTER_PORT"), service["spec"]["ports"][0]["port"].to_string());
    let outputs =
        run_job(&train, &[("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", free_port().to_string())]);
    let ranks = train.completions * env_value(env, "GPUS_PER_POD").parse::<usize>().unwrap();
    let printed = stdout(&outputs[0]);
    let summary: Value = serde_json::from_str(
        printed.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no summary: {printed}")),
    )
    .unwrap();
    assert_eq!(summary["world_size"], ranks, "{summary}");
    for key in ["cfg.json", "sae_weights.safetensors", "eval.json"] {
        assert!(s3.object(sae, key).is_some(), "no {key} in {sae}");
    }

    let (features_job, _) = cluster.job("features-job.yaml");
    run_job(&features_job, &[]);
    let index: Value =
        serde_json::from_slice(&s3.object(features, "features.json").expect("no features.json")).unwrap();
    assert!(index.is_object());
}
