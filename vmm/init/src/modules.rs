//! Kernel modules from the initramfs, loaded in the order its `order` file
//! gives (dependencies first).

use std::path::Path;

use nix::kmod::{ModuleInitFlags, finit_module};

use crate::Fatal;

/// Loads every module `dir/order` names; returns their names. A missing
/// `dir` means a kernel with everything built in.
pub fn load(dir: &Path) -> Result<Vec<String>, Fatal> {
    let order = match std::fs::read_to_string(dir.join("order")) {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Fatal::new(format!("reading {}/order", dir.display()), e)),
    };
    let mut loaded = Vec::new();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') {
            return Err(Fatal::msg(format!(
                "{}/order names {name:?}, which is not a file in that directory",
                dir.display()
            )));
        }
        let path = dir.join(name);
        let file = std::fs::File::open(&path)
            .map_err(|e| Fatal::new(format!("opening module {}", path.display()), e))?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(Fatal::new(format!("loading module {name}"), e)),
        }
        loaded.push(name.trim_end_matches(".ko").to_owned());
    }
    Ok(loaded)
}
