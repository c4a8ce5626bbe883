//! Chat templates render byte for byte as transformers' `apply_chat_template(..., tokenize=False)`
//! does: SmolLM2's template and conversations rendered by transformers
//! (tests/fixtures/make_ppl_reference.py writes tests/fixtures/smollm2/chat.json).

mod common;

use disp_models::chat::{ChatMessage, ChatTemplate};

fn reference_conversations() -> (String, Vec<(Vec<ChatMessage>, bool, String)>) {
    let path = common::fixture("smollm2/chat.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let conversations = json["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let messages = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            (messages, c["add_generation_prompt"].as_bool().unwrap(), c["rendered"].as_str().unwrap().to_owned())
        })
        .collect();
    (json["chat_template"].as_str().unwrap().to_owned(), conversations)
}

#[test]
fn smollm2_template_renders_like_transformers() {
    let (source, conversations) = reference_conversations();
    let template = ChatTemplate::from_source(&source, std::path::Path::new("chat.json"));
    for (messages, add_generation_prompt, expected) in &conversations {
        assert_eq!(&template.render(messages, *add_generation_prompt).unwrap(), expected, "{messages:?}");
    }
    // The default system turn is the template's, added only when the conversation has none.
    assert!(conversations[0].2.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
}

/// The folder fetch-assets converts from the GGUF carries the same template (needs the assets).
#[test]
fn converted_smollm2_folder_renders_like_transformers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct");
    assert!(dir.join("tokenizer_config.json").exists(), "{} is missing: run `cargo xtask fetch-assets` first", dir.display());
    let template = ChatTemplate::load(&dir).unwrap();
    for (messages, add_generation_prompt, expected) in &reference_conversations().1 {
        assert_eq!(&template.render(messages, *add_generation_prompt).unwrap(), expected, "{messages:?}");
    }
}
