//! Following an operation to its end: one progress bar per step on a terminal (indicatif),
//! plain progress lines otherwise, both on stderr so stdout keeps only the result.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use prost::Message as _;
use tonic::Code;

use crate::proto::google_longrunning as lro;
use crate::proto::v1;

use super::connect::Conn;
use super::output::{clean, short};
use super::report::CliError;

/// How often a watch cut by the server (shutting down, a restart) is resumed.
const RESUMES: u32 = 5;

pub fn metadata(operation: &lro::Operation) -> Option<v1::OperationMetadata> {
    let any = operation.metadata.as_ref()?;
    v1::OperationMetadata::decode(any.value.as_slice()).ok()
}

pub fn status_name(status: v1::OperationStatus) -> String {
    short(status.as_str_name(), "OPERATION_STATUS_")
}

pub fn step_name(status: v1::StepStatus) -> String {
    short(status.as_str_name(), "STEP_STATUS_")
}

/// Where progress goes.
enum View {
    Bars {
        multi: MultiProgress,
        overall: ProgressBar,
        steps: HashMap<String, ProgressBar>,
    },
    Lines,
}

struct Progress {
    view: View,
}

impl Progress {
    fn new(operation: &lro::Operation) -> Self {
        let view = if std::io::stderr().is_terminal() {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(100));
            overall.set_style(
                ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}% {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            let title = match metadata(operation) {
                Some(m) => format!("{} {}", m.verb, m.target),
                None => operation.name.clone(),
            };
            overall.set_prefix(clean(&title));
            View::Bars {
                multi,
                overall,
                steps: HashMap::new(),
            }
        } else {
            eprintln!("watching {}", operation.name);
            View::Lines
        };
        let mut progress = Self { view };
        if let Some(m) = metadata(operation) {
            for step in &m.steps {
                progress.step(&step.name, step.status(), &step.error);
            }
            progress.overall(m.progress_percent, m.status(), "");
        }
        progress
    }

    fn step_bar(&mut self, name: &str) -> Option<ProgressBar> {
        let View::Bars { multi, steps, .. } = &mut self.view else {
            return None;
        };
        let bar = steps.entry(name.to_owned()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(1));
            bar.set_style(
                ProgressStyle::with_template("  {prefix:<20} [{bar:10.green/white}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(clean(name));
            bar
        });
        Some(bar.clone())
    }

    fn step(&mut self, name: &str, status: v1::StepStatus, detail: &str) {
        let Some(bar) = self.step_bar(name) else {
            return;
        };
        let done = !matches!(
            status,
            v1::StepStatus::Pending | v1::StepStatus::Running | v1::StepStatus::Unspecified
        );
        bar.set_position(u64::from(done));
        let mut message = step_name(status);
        if !detail.is_empty() && status != v1::StepStatus::Running {
            message = format!("{message}: {}", clean(detail));
        }
        bar.set_message(message);
    }

    fn overall(&mut self, percent: i32, status: v1::OperationStatus, detail: &str) {
        if let View::Bars { overall, .. } = &self.view {
            overall.set_position(u64::try_from(percent.clamp(0, 100)).unwrap_or(0));
            let mut message = status_name(status);
            if !detail.is_empty() {
                message = format!("{message}: {}", clean(detail));
            }
            overall.set_message(message);
        }
    }

    fn event(&mut self, event: &v1::OperationEvent) {
        // Step events' messages start with the step's name, which the line or bar shows.
        let message = event
            .message
            .strip_prefix(&format!("{}: ", event.step))
            .filter(|_| !event.step.is_empty())
            .unwrap_or(&event.message);
        match self.view {
            View::Lines => {
                let what = if event.step.is_empty() {
                    status_name(event.status())
                } else {
                    format!("{} {}", clean(&event.step), step_name(event.step_status()))
                };
                eprintln!(
                    "[{:>3}%] {what}: {}",
                    event.progress_percent.clamp(0, 100),
                    clean(message)
                );
            }
            View::Bars { .. } => {
                if !event.step.is_empty() {
                    self.step(&event.step, event.step_status(), message);
                }
                let detail = if event.step.is_empty() { message } else { "" };
                self.overall(event.progress_percent, event.status(), detail);
            }
        }
    }

    fn finish(self, operation: &lro::Operation) {
        let Some(m) = metadata(operation) else {
            return;
        };
        match self.view {
            View::Bars {
                multi,
                overall,
                steps,
            } => {
                for step in &m.steps {
                    if let Some(bar) = steps.get(&step.name) {
                        bar.set_position(u64::from(!matches!(
                            step.status(),
                            v1::StepStatus::Pending | v1::StepStatus::Running
                        )));
                        bar.finish();
                    }
                }
                for bar in steps.values() {
                    if !bar.is_finished() {
                        bar.finish();
                    }
                }
                overall.set_position(u64::try_from(m.progress_percent.clamp(0, 100)).unwrap_or(0));
                overall.finish_with_message(status_name(m.status()));
                let _ = multi.clear();
                // The bars are gone from the screen; leave one line that says how it ended.
                eprintln!(
                    "{} {}: {}",
                    clean(&m.verb),
                    clean(&m.target),
                    status_name(m.status())
                );
            }
            View::Lines => eprintln!("{}: {}", operation.name, status_name(m.status())),
        }
    }
}

/// Streams the progress of `operation` until it has ended, then returns it as it ended
/// (re-read with GetOperation). A stream the server cuts (UNAVAILABLE: shutting down) is
/// resumed from the next event.
pub async fn follow(conn: &Conn, operation: lro::Operation) -> Result<lro::Operation, CliError> {
    if operation.done {
        return Ok(operation);
    }
    let name = operation.name.clone();
    let mut progress = Progress::new(&operation);
    let mut next = 0_i64;
    let mut resumes = 0;
    loop {
        let request = v1::WatchOperationRequest {
            name: name.clone(),
            from_sequence: next,
        };
        let outcome = async {
            let mut stream = conn
                .instances
                .clone()
                .watch_operation(request)
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                next = next.max(event.sequence + 1);
                progress.event(&event);
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        match outcome {
            Ok(()) => break,
            Err(status) if status.code() == Code::Unavailable && resumes < RESUMES => {
                resumes += 1;
                tokio::time::sleep(Duration::from_secs(u64::from(resumes))).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
    // The stream ends after the terminal event; the operation itself says how it ended.
    let mut ended = conn
        .operations
        .clone()
        .get_operation(conn.unary(lro::GetOperationRequest { name: name.clone() }))
        .await?
        .into_inner();
    while !ended.done {
        // The server answers within its 20 s; the deadline only guards against a hang.
        let mut request = tonic::Request::new(lro::WaitOperationRequest {
            name: name.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
        });
        request.set_timeout(Duration::from_secs(60));
        ended = conn
            .operations
            .clone()
            .wait_operation(request)
            .await?
            .into_inner();
    }
    progress.finish(&ended);
    Ok(ended)
}
