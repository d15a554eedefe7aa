//! hatchery turns provisioning jobs into running, finished virtual machines on libvirt.
//!
//! # Layout
//!
//! A job's path through the crate, in the order it travels:
//!
//! - [`job`]: the contract. Bytes become a validated [`job::Job`] or a list of problems.
//! - [`pipeline`]: runs one job through its stages with retries, rollback and events. It does
//!   not know whether the job came from a file or a queue.
//! - [`stages`]: one file per stage (overlay, domain, address, finish, teardown), all with the
//!   same [`stages::Stage`] interface, plus the rollback.
//! - [`hypervisor`]: libvirt access: shared connections, typed XML builders, metadata.
//! - [`guest`]: SSH to the guest: waiting for sshd, logging in, running the finish script once.
//! - [`events`]: the CloudEvents a job produces, and the sinks they go to.
//! - [`fleet`]: the broker side: workers consuming jobs from RabbitMQ, publishing events.
//! - [`observe`]: metrics derived from the events, and health endpoints.
//! - [`reconcile`]: finds and removes what no live job owns (`hatchery gc`).
//! - [`cli`]: the `hatchery` command's subcommands.

pub mod cli;
pub mod config;
pub mod events;
pub mod fleet;
pub mod guest;
pub mod hypervisor;
pub mod job;
pub mod observe;
pub mod pipeline;
pub mod reconcile;
pub mod retry;
pub mod secret;
pub mod settings;
pub mod stages;
