//! What the workspace's tests share: S3-compatible servers on loopback (moto, s3s-fs), the test
//! venv's programs, the tiny models of each family, free ports and bare HTTP requests, temporary folders, headless Chromium and
//! a global allocator that remembers the largest allocation.
//!
//! Standard library only, and nothing here knows the workspace's own crates: a crate's tests
//! build their typed settings (store options and the like) from what this crate hands them.

pub mod alloc;
pub mod chromium;
pub mod net;
pub mod s3;
pub mod temp;
pub mod tiny_models;
pub mod venv;

pub use alloc::CountingAllocator;
pub use chromium::chromium_dom;
pub use net::{free_port, http_response, http_status, wait_listening};
pub use s3::{s3s_fs_args, s3s_fs_binary, spawn_watched, S3Server};
pub use temp::{unique, TempDir};
pub use tiny_models::{run_tiny_models_script, tiny_model, tiny_model_dir, tiny_models_script};
pub use venv::{cache_dir, python, venv, venv_bin};
