//! How much each scenario does: the quick mode (`cargo bench`), the full mode
//! (`PREREQ_BENCH=full`) and the engine-only modes for profiling (`PREREQ_BENCH=engine`, both
//! paths; `engine-known`, `engine-held` or `engine-unique`, one path, `PREREQ_BENCH_N`
//! messages).

use std::time::Duration;

/// The sizes of one bench run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub mode: &'static str,
    /// Messages in raw and steady.
    pub n: usize,
    /// Clients in raw and steady.
    pub k: u64,
    /// Payments in the race.
    pub race_n: usize,
    /// Clients in the race.
    pub race_k: u64,
    /// Registrations arrive within 0..race_t after the payments.
    pub race_t: Duration,
    /// Messages per engine run (steady path).
    pub engine_n: usize,
    /// Messages per engine run (hold-then-release path).
    pub engine_hold_n: usize,
    /// Engine runs per path (the median is reported).
    pub engine_runs: usize,
    /// Payments in the big hold (0: it does not run).
    pub big_n: usize,
    /// Clients in the big hold.
    pub big_k: u64,
}

impl Sizes {
    /// The sizes `PREREQ_BENCH` asks for (quick when unset).
    pub fn from_env() -> Self {
        match std::env::var("PREREQ_BENCH").as_deref() {
            Ok("full") => Self {
                mode: "full",
                n: 100_000,
                k: 10_000,
                race_n: 10_000,
                race_k: 1_000,
                race_t: Duration::from_secs(5),
                engine_n: 500_000,
                engine_hold_n: 100_000,
                engine_runs: 5,
                big_n: 100_000,
                big_k: 1_000,
            },
            // For profiling (e.g. under callgrind): the engine scenario only, one run each.
            Ok("engine") => Self {
                mode: "engine",
                engine_n: 20_000,
                engine_hold_n: 10_000,
                engine_runs: 1,
                ..Self::quick()
            },
            // For instruction counts: one path, one run of `PREREQ_BENCH_N` messages (the
            // difference between two N gives the cost per message without the fixed costs).
            Ok(mode @ ("engine-known" | "engine-held" | "engine-unique")) => {
                let n = n_from_env(20_000);
                Self {
                    mode: match mode {
                        "engine-known" => "engine-known",
                        "engine-held" => "engine-held",
                        _ => "engine-unique",
                    },
                    engine_n: n,
                    engine_hold_n: n,
                    engine_runs: 1,
                    ..Self::quick()
                }
            }
            // Steady state alone, against bare lapin, three times in turn: `PREREQ_BENCH_N`
            // payments (50 000 unless set).
            Ok("steady") => Self {
                mode: "steady",
                n: n_from_env(50_000),
                k: 5_000,
                ..Self::quick()
            },
            // The big hold alone: `PREREQ_BENCH_N` payments (100 000 unless set).
            Ok("big") => Self {
                mode: "big",
                big_n: n_from_env(100_000),
                big_k: 1_000,
                ..Self::quick()
            },
            // The race alone (prereq's, with bare lapin beside it) and bare lapin releasing
            // the same payments, in turn, `PREREQ_BENCH_ROUNDS` times (3 unless set): where the
            // key path's time and the release's CPU go.
            Ok("race") => Self {
                mode: "race",
                ..Self::quick()
            },
            _ => Self::quick(),
        }
    }

    /// The broker scenarios run (not an engine-only mode).
    pub fn broker(&self) -> bool {
        !self.mode.starts_with("engine")
    }

    /// The known-key engine path runs.
    pub fn engine_known(&self) -> bool {
        !matches!(
            self.mode,
            "engine-held" | "engine-unique" | "big" | "steady" | "race"
        )
    }

    /// The held-then-released engine path runs.
    pub fn engine_held(&self) -> bool {
        !matches!(
            self.mode,
            "engine-known" | "engine-unique" | "big" | "steady" | "race"
        )
    }

    /// The known-key engine path with every message its own key runs (only on its own).
    pub fn engine_unique(&self) -> bool {
        self.mode == "engine-unique"
    }

    /// The held-memory measurement runs (not in a one-path mode).
    pub fn engine_memory(&self) -> bool {
        self.engine_known() && self.engine_held()
    }

    fn quick() -> Self {
        Self {
            mode: "quick",
            n: 20_000,
            k: 2_000,
            race_n: 5_000,
            race_k: 500,
            race_t: Duration::from_secs(2),
            engine_n: 50_000,
            engine_hold_n: 10_000,
            engine_runs: 3,
            big_n: 0,
            big_k: 0,
        }
    }
}

/// `PREREQ_BENCH_N`, else `default`.
fn n_from_env(default: usize) -> usize {
    std::env::var("PREREQ_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
