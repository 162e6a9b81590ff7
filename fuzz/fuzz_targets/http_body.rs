//! Fuzzes what the frontend does with an HTTP request body before any worker
//! sees it: parsing a chat or completions request, validating it, normalising
//! its messages, rendering the chat template and tokenizing. Every input ends
//! in a request or an OpenAI error, never a panic.
#![no_main]

use std::sync::OnceLock;

use kvrouter_frontend::openai::{self, ChatRequest, CompletionRequest};
use kvrouter_frontend::tokenizer::Preprocessor;
use libfuzzer_sys::fuzz_target;

fn pre() -> &'static Preprocessor {
    static PRE: OnceLock<Preprocessor> = OnceLock::new();
    PRE.get_or_init(Preprocessor::builtin)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the route, as the URL would.
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    if route % 2 == 0 {
        let Ok(req) = openai::parse_for_generation::<ChatRequest>(body) else {
            return;
        };
        let max = req.max_completion_tokens.or(req.common.max_tokens);
        if openai::validate(&req.common, max).is_err() {
            return;
        }
        let Ok(messages) = openai::normalise_messages(&req.messages) else {
            return;
        };
        if let Ok(prompt) = pre().render_chat(&messages, req.tools.as_ref()) {
            let _ = pre().encode(&prompt);
        }
    } else {
        let Ok(req) = openai::parse_for_generation::<CompletionRequest>(body) else {
            return;
        };
        let _ = openai::validate(&req.common, req.common.max_tokens);
        if let openai::Prompt::Text(t) = &req.prompt {
            let _ = pre().encode(t);
        }
    }
});
