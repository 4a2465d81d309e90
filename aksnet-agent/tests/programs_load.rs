//! Every kernel program of the agent loads on the running kernel (the verifier takes it), even
//! those this kernel's agent would not attach. Run by `cargo xtask vm-test` inside each kernel
//! of the matrix, where kprobes and fentry work; this machine's kernel refuses fentry.

use aksnet_agent::capture::ebpf::load_every_program;

#[test]
#[ignore = "needs root and a kernel that allows kprobes and fentry (not this machine's): `cargo xtask vm-test` runs it in each VM"]
fn every_program_loads() {
    let loads = load_every_program().expect("the eBPF object loads");
    assert!(!loads.is_empty(), "the object has no programs");
    for load in &loads {
        match &load.outcome {
            Ok(true) => println!("loaded {}", load.program),
            Ok(false) => println!("not attempted {}: {}", load.program, load.note),
            Err(err) => println!("refused {}: {err}", load.program),
        }
    }
    let refused: Vec<&str> = loads
        .iter()
        .filter(|l| l.outcome.is_err())
        .map(|l| l.program.as_str())
        .collect();
    assert!(refused.is_empty(), "programs refused: {refused:?}");
}
