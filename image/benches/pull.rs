//! Cold and warm pull plus root filesystem build of a 3-layer image of about
//! 50 MB, beside `skopeo copy` + `umoci unpack` + `mkfs.erofs` of the same
//! image in the same run, and the store's de-duplication when several VMs
//! start from one image at once.
//!
//!   cargo bench -p runv-image --bench pull
//!
//! Needs docker-registry, skopeo, umoci and mkfs.erofs; the image is made of
//! the files under `RUNV_BENCH_TREE` (default `/usr/lib/python3.11`), dealt
//! round-robin into three gzip layers.

#[path = "../tests/support/mod.rs"]
mod support;

use oci_client::secrets::RegistryAuth;
use runv_image::PullConfig;
use runv_image::images::{Images, PullPolicy};
use runv_image::pull::parse_reference;
use runv_image::unpack::Limits;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{LayerBlob, Layout, Registry};

fn layers_from(tree: &Path) -> Vec<LayerBlob> {
    let mut builders: Vec<tar::Builder<Vec<u8>>> =
        (0..3).map(|_| tar::Builder::new(Vec::new())).collect();
    let mut files = Vec::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    for (i, file) in files.iter().enumerate() {
        let name = Path::new("app").join(file.strip_prefix(tree).unwrap());
        builders[i % 3].append_path_with_name(file, name).unwrap();
    }
    builders
        .into_iter()
        .map(|b| LayerBlob {
            tar: b.into_inner().unwrap(),
            gzip: true,
        })
        .collect()
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

async fn timed_async<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

fn run(cmd: &mut Command) -> Duration {
    timed(|| support::run(cmd)).1
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let m = e.as_ref().unwrap().metadata().unwrap();
            if m.is_dir() {
                stack.push(e.unwrap().path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn ms(d: Duration) -> String {
    format!("{:>8.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let tools = ["docker-registry", "skopeo", "umoci", "mkfs.erofs"];
    if !support::require_tools("bench pull", &tools) {
        return;
    }
    let tree = PathBuf::from(
        std::env::var("RUNV_BENCH_TREE").unwrap_or_else(|_| "/usr/lib/python3.11".into()),
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let layers = layers_from(&tree);
    let raw: usize = layers.iter().map(|l| l.tar.len()).sum();
    let config = serde_json::json!({"Cmd": ["/bin/sh"]});
    let image = layout.image(&layers, config, "amd64");
    layout.tag(&image, "v1");
    let registry = Registry::start(None);
    registry.push(&layout.dir, "v1", "bench/app", &[]);
    let name = format!("{}/bench/app:v1", registry.addr);
    let reference = parse_reference(&name).unwrap();
    let anon = RegistryAuth::Anonymous;
    println!(
        "image: 3 gzip layers, {:.1} MB uncompressed, from {}",
        raw as f64 / 1e6,
        tree.display()
    );

    let rounds = 5;
    println!("median of {rounds} rounds, each from an empty store\n");
    let mut runv: Vec<[Duration; 5]> = Vec::new();
    let mut rootfs_size = 0;
    for round in 0..rounds {
        let root = tmp.path().join(format!("node-{round}"));
        let images = Images::open(
            &root,
            PullConfig::default(),
            Limits::default(),
            Default::default(),
        )
        .unwrap();
        let (_, pull) = timed_async(images.puller().pull(&reference, &anon)).await;
        let (ready, build) =
            timed_async(images.ensure(&reference, &anon, PullPolicy::IfNotPresent)).await;
        rootfs_size = std::fs::metadata(&ready.unwrap().rootfs).unwrap().len();
        let (_, local) =
            timed_async(images.ensure(&reference, &anon, PullPolicy::IfNotPresent)).await;
        let (_, always) = timed_async(images.ensure(&reference, &anon, PullPolicy::Always)).await;
        let dest = tmp.path().join(format!("applier-{round}"));
        std::fs::create_dir(&dest).unwrap();
        let layers = images
            .puller()
            .pull(&reference, &anon)
            .await
            .unwrap()
            .layers;
        let (_, apply) = timed(|| {
            runv_image::unpack::unpack_image(
                images.puller().store(),
                &layers,
                &dest,
                Limits::default(),
            )
            .unwrap()
        });
        runv.push([pull, build, local, always, apply]);
    }
    let median = |i: usize, rows: &[[Duration; 5]]| {
        let mut v: Vec<Duration> = rows.iter().map(|r| r[i]).collect();
        v.sort();
        v[v.len() / 2]
    };
    println!("runv-image");
    println!(
        "  cold pull (3 layers + config, verified)     {}",
        ms(median(0, &runv))
    );
    println!(
        "  cold unpack + mkfs.erofs                    {}",
        ms(median(1, &runv))
    );
    println!(
        "    of which the layer applier alone          {}",
        ms(median(4, &runv))
    );
    println!(
        "  cold total                                  {}",
        ms(median(0, &runv) + median(1, &runv))
    );
    println!(
        "  warm, IfNotPresent (no registry traffic)    {}",
        ms(median(2, &runv))
    );
    println!(
        "  warm, Always (manifest resolved, no blobs)  {}",
        ms(median(3, &runv))
    );
    println!(
        "  rootfs image                                {:>8.1} MB",
        rootfs_size as f64 / 1e6
    );

    // The reference toolchain on the same image.
    let mut reference_rows: Vec<[Duration; 5]> = Vec::new();
    for round in 0..rounds {
        let oci = tmp.path().join(format!("skopeo-oci-{round}"));
        let bundle = tmp.path().join(format!("bundle-{round}"));
        let img = tmp.path().join(format!("reference-{round}.img"));
        let src = format!("docker://{name}");
        let dst = format!("oci:{}:v1", oci.display());
        let copy = run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &src,
            &dst,
        ]));
        let unpack = run(Command::new("umoci")
            .args(["unpack", "--image", &dst[4..]])
            .arg(&bundle));
        let mkfs = run(Command::new("mkfs.erofs")
            .args(["--quiet", "--preserve-mtime"])
            .arg(&img)
            .arg(bundle.join("rootfs")));
        let warm = run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &src,
            &dst,
        ]));
        reference_rows.push([copy, unpack, mkfs, warm, Duration::ZERO]);
    }
    let r = |i| median(i, &reference_rows);
    println!("\nskopeo + umoci + mkfs.erofs");
    println!("  cold skopeo copy                            {}", ms(r(0)));
    println!("  cold umoci unpack                           {}", ms(r(1)));
    println!("  cold mkfs.erofs                             {}", ms(r(2)));
    println!(
        "  cold total                                  {}",
        ms(r(0) + r(1) + r(2))
    );
    println!("  warm skopeo copy (same layout again)        {}", ms(r(3)));

    // De-duplication: four VMs of a new image at once.
    let root4 = tmp.path().join("node4");
    let images4 = Images::open(
        &root4,
        PullConfig::default(),
        Limits::default(),
        Default::default(),
    )
    .unwrap();
    let start = Instant::now();
    let all = futures::future::join_all(
        (0..4).map(|_| images4.ensure(&reference, &anon, PullPolicy::IfNotPresent)),
    )
    .await;
    let four = start.elapsed();
    assert!(all.iter().all(Result::is_ok));
    let store = dir_bytes(&root4.join("blobs"));
    let disks = dir_bytes(&root4.join("rootfs"));
    println!("\nde-duplication: 4 VMs of one image started together");
    println!("  wall time                                   {}", ms(four));
    println!(
        "  blobs fetched                               {:>8} (image has 4: config + 3 layers)",
        images4.puller().blob_fetches()
    );
    println!(
        "  blob store                                  {:>8.1} MB (one copy)",
        store as f64 / 1e6
    );
    println!(
        "  root filesystem images                      {:>8.1} MB (one, shared)",
        disks as f64 / 1e6
    );
}
