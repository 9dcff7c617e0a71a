include!("../build-support/torch_link.rs");

use std::path::{Path, PathBuf};

fn main() {
    link_libtorch();
    build_c10d_shim();
}

/// Compiles trainer/csrc (the C ABI over PyTorch's c10d used by `trainer::dist`) against the
/// libtorch that torch-sys links, and links it with libtorch_cpu and libc10.
///
/// The NCCL half needs the CUDA and NCCL headers, which the torch wheel does not ship: they come
/// from the CUDA wheels in the same site-packages (`pip install "cuda-toolkit[nvcc,cccl]==13.0.2"`,
/// done by scripts/setup.sh), or from `CUDA_HOME`. Without them (or without libtorch_cuda, or
/// with `SAE_NO_NCCL=1`) the shim is built with Gloo only, with a warning and the cfg
/// `sae_no_nccl`.
fn build_c10d_shim() {
    println!("cargo::rustc-check-cfg=cfg(sae_no_nccl)");
    for file in ["c10d_shim.cpp", "c10d_shim_nccl.cpp", "c10d_shim.h", "c10d_shim_internal.h"] {
        println!("cargo:rerun-if-changed=csrc/{file}");
    }
    for var in ["LIBTORCH_INCLUDE", "LIBTORCH_CXX11_ABI", "CUDA_HOME", "CUDA_PATH", "GLOO_INCLUDE_DIR", "SAE_NO_NCCL"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: cannot find libtorch's headers for the c10d shim");
    };
    let lib_dir = PathBuf::from(lib_dir);
    // The same layout for the torch wheel and for a libtorch archive: <root>/lib, <root>/include.
    let torch_root = match std::env::var("LIBTORCH_INCLUDE") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => lib_dir.parent().expect("libtorch lib dir has a parent").to_path_buf(),
    };
    let torch_includes = [torch_root.join("include"), torch_root.join("include/torch/csrc/api/include")];
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());

    let base = |build: &mut cc::Build| {
        build.cpp(true).pic(true).std("c++17").warnings(true).extra_warnings(true);
        build.define("_GLIBCXX_USE_CXX11_ABI", abi.as_str());
        // -isystem: libtorch's own headers warn a lot, which is not ours to fix.
        for dir in &torch_includes {
            build.flag("-isystem").flag(dir.to_str().expect("utf-8 path"));
        }
    };

    let nccl = nccl_includes(&torch_root, &lib_dir);
    // The NCCL object joins the Gloo one in a single static library (so that link order between
    // two archives cannot matter).
    let mut nccl_objects = Vec::new();
    match nccl {
        Ok(includes) => {
            let mut build = cc::Build::new();
            base(&mut build);
            build.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
            build.define("SAE_HAVE_NCCL", None);
            for dir in &includes {
                build.flag("-isystem").flag(dir.to_str().expect("utf-8 path"));
            }
            build.file("csrc/c10d_shim_nccl.cpp");
            match build.try_compile_intermediates() {
                Ok(objects) => nccl_objects = objects,
                Err(e) => println!(
                    "cargo:warning=trainer: the NCCL half of the c10d shim failed to compile, \
                     building with Gloo only: {e}"
                ),
            }
        }
        Err(why) => println!(
            "cargo:warning=trainer: building the c10d shim without NCCL ({why}); \
             `pip install \"cuda-toolkit[nvcc,cccl]==13.0.2\"` into torch's Python \
             (scripts/setup.sh does) or set CUDA_HOME to enable it"
        ),
    }

    let have_nccl = !nccl_objects.is_empty();
    let mut build = cc::Build::new();
    base(&mut build);
    build.define("USE_C10D_GLOO", None);
    gloo_include(&mut build);
    if have_nccl {
        build.define("SAE_HAVE_NCCL", None);
    }
    build.objects(&nccl_objects);
    build.file("csrc/c10d_shim.cpp").compile("sae_c10d");

    // The shim's static libraries come first on the link line; the libraries they need follow.
    // torch-sys links these too, but naming them here keeps the order right for this crate.
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    if have_nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else {
        println!("cargo:rustc-cfg=sae_no_nccl");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// Gloo's headers (ProcessGroupGloo.hpp includes them; libtorch_cpu carries Gloo itself but the
/// wheel ships no gloo headers): `GLOO_INCLUDE_DIR`, else Debian's libgloo-dev in /usr/include.
/// Only pointers to Gloo objects appear in the torch classes the shim instantiates, so the
/// headers' version need not match the Gloo built into libtorch.
fn gloo_include(build: &mut cc::Build) {
    let dirs = match std::env::var("GLOO_INCLUDE_DIR") {
        Ok(dir) => vec![PathBuf::from(dir)],
        Err(_) => vec![PathBuf::from("/usr/include"), PathBuf::from("/usr/local/include")],
    };
    match dirs.iter().find(|d| d.join("gloo/algorithm.h").exists()) {
        Some(dir) if dir.as_path() != Path::new("/usr/include") => {
            build.flag("-isystem").flag(dir.to_str().expect("utf-8 path"));
        }
        Some(_) => {}
        None => panic!(
            "the c10d shim needs Gloo's headers (gloo/algorithm.h) in {}: install Debian's \
             libgloo-dev (scripts/setup.sh does) or set GLOO_INCLUDE_DIR",
            display_dirs(&dirs)
        ),
    }
}

/// The include directories for the NCCL half, or why it cannot be built.
fn nccl_includes(torch_root: &Path, lib_dir: &Path) -> Result<Vec<PathBuf>, String> {
    if std::env::var("SAE_NO_NCCL").is_ok_and(|v| v == "1") {
        return Err("SAE_NO_NCCL=1".into());
    }
    for lib in ["libtorch_cuda.so", "libc10_cuda.so"] {
        if !lib_dir.join(lib).exists() {
            return Err(format!("{} has no {lib}: a CPU-only libtorch", lib_dir.display()));
        }
    }
    let mut candidates = Vec::new();
    // The torch wheel's CUDA dependencies sit next to it in site-packages.
    if let Some(site) = torch_root.parent() {
        let nvidia = site.join("nvidia");
        for sub in ["cu13/include", "cu13/include/cccl", "nccl/include"] {
            candidates.push(nvidia.join(sub));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            candidates.push(Path::new(&home).join("include"));
            candidates.push(Path::new(&home).join("include/cccl"));
        }
    }
    candidates.push(PathBuf::from("/usr/include"));
    let dirs: Vec<PathBuf> = candidates.into_iter().filter(|d| d.is_dir()).collect();
    // cuda_runtime_api.h: the runtime; crt/host_config.h: nvcc's headers; nv/target: CCCL's.
    for header in ["cuda_runtime_api.h", "crt/host_config.h", "nv/target", "nccl.h"] {
        if !dirs.iter().any(|d| d.join(header).exists()) {
            return Err(format!("no {header} in {}", display_dirs(&dirs)));
        }
    }
    // /usr/include is searched anyway; passing it as -isystem would reorder the system headers.
    Ok(dirs.into_iter().filter(|d| d != Path::new("/usr/include")).collect())
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "any CUDA include directory".to_owned();
    }
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}
