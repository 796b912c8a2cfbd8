//! Placeholder until the operator issue lands: the binary exists so the
//! workspace layout is final, and says plainly that it does nothing yet.
fn main() {
    eprintln!("starling-operator: not implemented yet (see the operator issue)");
    std::process::exit(2);
}
