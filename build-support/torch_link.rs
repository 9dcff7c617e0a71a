// Shared by the build scripts of every crate that links libtorch (included with `include!`).
//
// torch-sys gives binaries no rpath, so without LD_LIBRARY_PATH they fail to find
// libtorch_cpu.so. We add an rpath to the torch lib folder that torch-sys built against, read
// from DEP_TCH_LIBTORCH_LIB (visible only to crates that depend on torch-sys directly).
//
// The linker also drops libtorch_cuda.so because nothing references it, and then
// `tch::Cuda::is_available()` is false even on a GPU; `--no-as-needed` keeps it.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries get no rpath to libtorch");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
