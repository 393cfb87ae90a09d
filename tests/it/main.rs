//! Integration tests: the real host, the real example plugins (built for
//! wasm32-wasip2 on first use) and the negative fixtures.

mod admin;
mod audit;
mod byo_model;
mod connect;
mod demo;
mod drain;
mod embedding;
mod engine;
mod examples;
mod faults;
mod init;
mod lanes;
mod limits;
mod llm_link;
mod loading;
mod mqtt;
mod packs;
mod pipeline;
mod polyglot;
mod reload;
mod remote;
mod scale;
mod security;
mod serve;
