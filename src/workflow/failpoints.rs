//! Deliberate faults, for crash and failure tests of the real binary (configured with
//! `failpoints = ["service=pause"]` or `IM_FAILPOINTS=service=pause`; empty by default and
//! announced loudly at start-up when set).
//!
//! - `STEP=pause`: the step blocks before its action until the process is killed;
//! - `STEP=error`: the step fails (fatally) before its action;
//! - `STEP=error-after`: the step fails after its action took effect;
//! - `STEP=exit-after`: the process exits at once after the step's action returned, before
//!   its outcome is saved (the crash window every step must survive);
//! - `undo:STEP=exit`: the process exits at once before the step's undo (a crash in the
//!   middle of a rollback).

use async_trait::async_trait;

use crate::domain::Operation;

use super::{StepError, StepHook, StepResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Pause,
    Error,
    ErrorAfter,
    ExitAfter,
    Exit,
}

/// The exit status of a process ended by a failpoint (what a test expects to see).
pub const EXIT_STATUS: i32 = 86;

fn exit_now(what: &str) -> ! {
    // Say so on stderr (not through the logger, which may buffer), then end without
    // unwinding or running anything else: as close to a kill as a process can do itself.
    eprintln!("failpoint: exiting the process {what}");
    std::process::exit(EXIT_STATUS)
}

#[derive(Debug, Clone, Default)]
pub struct Failpoints(Vec<(String, Action)>);

impl Failpoints {
    pub fn parse(specs: &[String]) -> Result<Self, String> {
        let mut points = Vec::new();
        // An empty entry (e.g. `IM_FAILPOINTS=`) means none.
        for spec in specs.iter().filter(|s| !s.trim().is_empty()) {
            let (step, action) = spec
                .split_once('=')
                .ok_or_else(|| format!("failpoint {spec:?} is not STEP=ACTION"))?;
            let action = match action {
                "pause" => Action::Pause,
                "error" => Action::Error,
                "error-after" => Action::ErrorAfter,
                "exit-after" => Action::ExitAfter,
                "exit" if step.starts_with("undo:") => Action::Exit,
                other => {
                    return Err(format!(
                        "failpoint action {other:?} is not pause, error, error-after, exit-after (or exit for undo:STEP)"
                    ));
                }
            };
            points.push((step.to_owned(), action));
        }
        Ok(Self(points))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn action(&self, step: &str) -> Option<Action> {
        self.0.iter().find(|(s, _)| s == step).map(|(_, a)| *a)
    }
}

#[async_trait]
impl StepHook for Failpoints {
    async fn before(&self, _: &Operation, step: &str) -> StepResult<()> {
        match self.action(step) {
            Some(Action::Pause) => {
                tracing::warn!(step, "failpoint: pausing until the process is killed");
                std::future::pending::<()>().await;
                Ok(())
            }
            Some(Action::Error) => Err(StepError::Fatal(format!("failpoint: {step} fails"))),
            _ => Ok(()),
        }
    }

    async fn after(&self, _: &Operation, step: &str) -> StepResult<()> {
        match self.action(step) {
            Some(Action::ErrorAfter) => Err(StepError::Fatal(format!(
                "failpoint: {step} fails after its action"
            ))),
            Some(Action::ExitAfter) => exit_now(&format!("after {step}")),
            _ => Ok(()),
        }
    }

    async fn before_undo(&self, _: &Operation, step: &str) -> StepResult<()> {
        match self.action(&format!("undo:{step}")) {
            Some(Action::Exit) => exit_now(&format!("before undoing {step}")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let points =
            Failpoints::parse(&["service=pause".into(), "secret=error-after".into()]).unwrap();
        assert_eq!(points.action("service"), Some(Action::Pause));
        assert_eq!(points.action("secret"), Some(Action::ErrorAfter));
        assert_eq!(points.action("database"), None);
        assert!(Failpoints::parse(&["service".into()]).is_err());
        assert!(Failpoints::parse(&[String::new()]).unwrap().is_empty());
        assert!(Failpoints::parse(&["service=explode".into()]).is_err());
        let points =
            Failpoints::parse(&["secret=exit-after".into(), "undo:secret=exit".into()]).unwrap();
        assert_eq!(points.action("secret"), Some(Action::ExitAfter));
        assert_eq!(points.action("undo:secret"), Some(Action::Exit));
        // Exiting before a step's action is what `pause` plus a kill is for.
        assert!(Failpoints::parse(&["secret=exit".into()]).is_err());
    }
}
