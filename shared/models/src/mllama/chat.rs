//! Prompts: the tokenizer (`tokenizer.json` through the `tokenizers` crate), the Llama 3.2
//! Vision Instruct chat format, and the cross-attention mask built from the positions of the
//! `<|image|>` tokens (transformers' `get_cross_attention_token_mask` and
//! `convert_sparse_cross_attention_mask_to_dense`).
//!
//! The chat format for conversations with images: `<|begin_of_text|>`, then per message
//! `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` with images as
//! `<|image|>`, then `<|start_header_id|>assistant<|end_header_id|>\n\n` when the answer is to be
//! generated. (The published template adds a system block with dates only when no image is
//! present; every prompt here has one.)

use std::path::Path;

/// The `<|image|>` token.
pub const IMAGE_TOKEN: &str = "<|image|>";
/// Beginning of text.
pub const BOS_TOKEN: &str = "<|begin_of_text|>";
/// End of a message (and of generation).
pub const EOT_TOKEN: &str = "<|eot_id|>";

/// A part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// An image.
    Image,
    /// Text.
    Text(String),
}

/// A message of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// Its parts in order.
    pub content: Vec<Part>,
}

impl Message {
    /// A user message: one image, then the text.
    pub fn user_with_image(text: &str) -> Self {
        Message {
            role: "user".into(),
            content: vec![Part::Image, Part::Text(text.into())],
        }
    }

    /// An assistant message.
    pub fn assistant(text: &str) -> Self {
        Message {
            role: "assistant".into(),
            content: vec![Part::Text(text.into())],
        }
    }
}

/// Why a tokenizer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Loading `tokenizer.json`.
    #[error("tokenizer {path}: {message}")]
    Load {
        /// File.
        path: String,
        /// Cause.
        message: String,
    },
    /// A special token the chat format needs is missing.
    #[error("the tokenizer has no {0} token")]
    MissingToken(String),
    /// Encoding failed.
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// The tokenizer with the chat format.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// `<|image|>`.
    pub image_token: u32,
    /// `<|eot_id|>`.
    pub eot_token: u32,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ChatError> {
        let bytes = std::fs::read(path).map_err(|e| ChatError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            ChatError::Load { message, .. } => ChatError::Load {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Reads the contents of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ChatError> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ChatError::Load {
            path: "tokenizer.json".into(),
            message: e.to_string(),
        })?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| ChatError::MissingToken(t.into()))
        };
        id(BOS_TOKEN)?;
        Ok(ChatTokenizer {
            image_token: id(IMAGE_TOKEN)?,
            eot_token: id(EOT_TOKEN)?,
            tokenizer,
        })
    }

    /// The conversation as text in the chat format.
    pub fn render(messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::from(BOS_TOKEN);
        for m in messages {
            out += &format!("<|start_header_id|>{}<|end_header_id|>\n\n", m.role);
            for p in &m.content {
                match p {
                    Part::Image => out += IMAGE_TOKEN,
                    Part::Text(t) => out += t,
                }
            }
            out += EOT_TOKEN;
        }
        if add_generation_prompt {
            out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
        }
        out
    }

    /// Token ids of text (special tokens written in it are recognised; none is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ChatError::Encode(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of the conversation.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, ChatError> {
        self.encode(&Self::render(messages, add_generation_prompt))
    }

    /// Text of token ids (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ChatError::Encode(e.to_string()))
    }
}

/// For each image, the tokens `[start, end)` that see it: from its `<|image|>` token to the next
/// one, consecutive image tokens sharing the span that follows them (transformers'
/// `get_cross_attention_token_mask`).
pub fn image_spans(ids: &[u32], image_token: u32) -> Vec<(usize, usize)> {
    let at: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == image_token)
        .map(|(i, _)| i)
        .collect();
    let mut spans: Vec<(usize, usize)> = at
        .iter()
        .enumerate()
        .map(|(k, &s)| (s, at.get(k + 1).copied().unwrap_or(ids.len())))
        .collect();
    let mut last_end = ids.len();
    for span in spans.iter_mut().rev() {
        if span.0 + 1 == span.1 {
            span.1 = last_end;
        }
        last_end = span.1;
    }
    spans
}

/// The dense cross-attention mask `[ids.len(), images, max_tiles]` (1: the token sees the tile)
/// for images of `num_tiles` tiles.
pub fn cross_attention_mask(ids: &[u32], image_token: u32, num_tiles: &[usize], max_tiles: usize) -> Vec<f32> {
    let images = num_tiles.len();
    let mut m = vec![0f32; ids.len() * images * max_tiles];
    for (k, ((start, end), tiles)) in image_spans(ids, image_token).into_iter().zip(num_tiles).enumerate() {
        for t in start..end.min(ids.len()) {
            for tile in 0..(*tiles).min(max_tiles) {
                m[(t * images + k) * max_tiles + tile] = 1.0;
            }
        }
    }
    m
}

/// Loads a `tokenizer.json` from a checkpoint directory.
pub fn load(dir: &Path) -> Result<ChatTokenizer, ChatError> {
    ChatTokenizer::from_file(&dir.join("tokenizer.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_images_share_the_span_after_them() {
        // ids: 0 I I 3 I 5 6
        let ids = [0, 9, 9, 3, 9, 5, 6];
        assert_eq!(image_spans(&ids, 9), vec![(1, 4), (2, 4), (4, 7)]);
        assert_eq!(image_spans(&[1, 2], 9), vec![]);
        assert_eq!(image_spans(&[9, 1], 9), vec![(0, 2)]);
        let m = cross_attention_mask(&[1, 9, 2], 9, &[2], 4);
        assert_eq!(m, vec![0., 0., 0., 0., 1., 1., 0., 0., 1., 1., 0., 0.]);
    }
}
