//! The live mock worker over the request plane: its output-length model.

use bytes::Bytes;
use kvrouter_core::llm::{FinishReason, LlmEngineOutput, PreprocessedRequest};
use kvrouter_mocker::service::{self, WorkerConfig};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;

#[tokio::test]
async fn an_answer_is_never_empty_even_when_every_token_may_end_it() {
    let node = Node::in_process();
    let endpoint: EndpointId = "eos.backend.generate".parse().unwrap();
    let cfg = WorkerConfig {
        eos_probability: 1.0,
        ..WorkerConfig::default()
    };
    let w = service::start(&node, &endpoint, 1, cfg).await.unwrap();
    let address = node.discovery.list(&endpoint).await.unwrap()[0]
        .address
        .clone();
    for seed in 0..20u64 {
        // No max_tokens, an EOS token: only the output-length model ends it.
        let mut req = PreprocessedRequest {
            token_ids: (3..40).collect(),
            eos_token_ids: vec![2],
            ..Default::default()
        };
        req.sampling_options.seed = Some(seed);
        let body = Bytes::from(serde_json::to_vec(&req).unwrap());
        let mut s = node.call(&address, body).await.unwrap();
        let mut outs = Vec::new();
        while let Some(r) = s.next().await {
            outs.push(serde_json::from_slice::<LlmEngineOutput>(&r.unwrap()).unwrap());
        }
        assert_eq!(outs.len(), 2, "one token, then the EOS: {outs:?}");
        assert_ne!(outs[0].token_ids, vec![2], "the first token is text");
        assert_eq!(outs[1].finish_reason, Some(FinishReason::Eos));
    }
    drop(w);
}
