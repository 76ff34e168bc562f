//! The preview's text side against the peers' own outputs (fixtures/generate_prompts.py):
//! transformers' and open_clip's CLIP tokenizers, A1111's `parse_prompt_attention`,
//! `extra_networks.parse_prompt` + the Lora extension's multipliers, and `tokenize_line`.

mod common;

use loratool::family::block_weight::BlockWeightSpec;
use loratool::preview::prompt::{parse_emphasis, parse_extra_networks, PromptPiece};
use loratool::preview::tokenizer::{
    ChunkOptions, ClipPadding, ClipTokenizer, TextualInversion, WINDOW_LENGTH,
};
use serde_json::Value;

fn cases(name: &str) -> (Value, Vec<Value>) {
    let path = common::fixtures().join("prompts").join(name);
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    let mut file: Value = serde_json::from_str(&text).expect("fixture parses");
    let cases = file["cases"].as_array().expect("cases").clone();
    (file["meta"].take(), cases)
}

/// Weights are written as Python's `repr`, which Rust parses to the same double.
fn weight(value: &Value) -> f64 {
    value
        .as_str()
        .expect("weight string")
        .parse()
        .expect("float")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn str_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

/// Prompts whose ids differ from a peer's, and why (docs/DECISIONS.md, "Preview").
const HTML_ENTITIES: &str = "&amp; &lt;3 R&amp;D";
const SPECIALS: &str = "<|endoftext|> and <|startoftext|> <|ENDOFTEXT|>";

#[test]
fn token_ids_equal_transformers_clip_tokenizer_but_for_html_entities() {
    let tokenizer = ClipTokenizer::new().unwrap();
    let (_, cases) = cases("tokenizer.json");
    assert!(cases.len() >= 40);
    let mut differing = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        if tokenizer.encode(prompt) != ids(&case["transformers"]) {
            differing.push(prompt);
        }
    }
    // ftfy decodes HTML entities (on lines without '<'); we do not.
    assert_eq!(differing, [HTML_ENTITIES]);
}

#[test]
fn token_ids_equal_open_clip_but_for_html_entities_and_special_token_text() {
    let tokenizer = ClipTokenizer::new().unwrap();
    let (_, cases) = cases("tokenizer.json");
    let mut differing = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        if tokenizer.encode(prompt) != ids(&case["open_clip"]) {
            differing.push(prompt);
        }
    }
    // open_clip names its specials <start_of_text>/<end_of_text>, so "<|endoftext|>" is text to it.
    assert_eq!(differing, [SPECIALS, HTML_ENTITIES]);
}

/// A1111's piece list, with its BREAK marker read the way tokenize_line reads it.
fn peer_pieces(case: &Value) -> Vec<PromptPiece> {
    case["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|piece| {
            let text = piece[0].as_str().unwrap().to_string();
            let weight = weight(&piece[1]);
            if text == "BREAK" && weight == -1.0 {
                PromptPiece::Break
            } else {
                PromptPiece::Text { text, weight }
            }
        })
        .collect()
}

/// Equal texts and bit-identical weights.
fn same_pieces(ours: &[PromptPiece], peer: &[PromptPiece]) -> bool {
    ours.len() == peer.len()
        && ours.iter().zip(peer).all(|pair| match pair {
            (PromptPiece::Break, PromptPiece::Break) => true,
            (
                PromptPiece::Text { text: a, weight: x },
                PromptPiece::Text { text: b, weight: y },
            ) => a == b && x.to_bits() == y.to_bits(),
            _ => false,
        })
}

#[test]
fn emphasis_pieces_and_weights_equal_parse_prompt_attention() {
    let (_, cases) = cases("emphasis.json");
    assert!(cases.len() >= 50);
    let mut errors = 0;
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ours = parse_emphasis(prompt);
        if case.get("error").is_some() {
            errors += 1;
            assert!(ours.is_err(), "{prompt:?}: A1111 fails, we gave {ours:?}");
            continue;
        }
        let ours = ours.unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
        let peer = peer_pieces(case);
        assert!(
            same_pieces(&ours, &peer),
            "{prompt:?}\n ours {ours:?}\n peer {peer:?}"
        );
    }
    assert_eq!(errors, 3);
}

#[test]
fn bad_emphasis_weight_is_a_one_line_error() {
    let err = parse_emphasis("a (b:1.2.3) c").unwrap_err();
    assert_eq!(
        err.to_string(),
        "emphasis weight '1.2.3' in 'a (b:1.2.3) c' is not a number"
    );
    // Without an open '(' the same text is plain text, as in A1111.
    assert!(parse_emphasis("a b:1.2.3) c").is_ok());
}

#[test]
fn extra_network_tags_equal_a1111_parse_prompt_and_lora_multipliers() {
    let (_, cases) = cases("extra_networks.json");
    assert!(cases.len() >= 25);
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let networks = case["networks"].as_array().unwrap();
        let lora_failure = networks
            .iter()
            .find_map(|n| n.get("lora_error").map(|e| e.as_str().unwrap().to_string()));
        // A1111 parses inf/nan and goes on; we refuse a non-finite weight.
        let non_finite = networks.iter().any(|n| {
            n.get("lora")
                .is_some_and(|l| !weight(&l["te"]).is_finite() || !weight(&l["unet"]).is_finite())
        });
        let ours = parse_extra_networks(prompt);
        if lora_failure.is_some() || non_finite {
            assert!(
                ours.is_err(),
                "{prompt:?}: A1111 {lora_failure:?}, we {ours:?}"
            );
            continue;
        }
        let ours = ours.unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
        assert_eq!(ours.text, case["text"].as_str().unwrap(), "{prompt:?}");
        let peer_loras: Vec<&Value> = networks
            .iter()
            .filter(|n| n.get("lora").is_some())
            .collect();
        let peer_others: Vec<&Value> = networks
            .iter()
            .filter(|n| n.get("lora").is_none())
            .collect();
        assert_eq!(ours.loras.len(), peer_loras.len(), "{prompt:?}");
        assert_eq!(ours.others.len(), peer_others.len(), "{prompt:?}");
        // A1111 groups tags by kind (lora before lyco); within a kind the order is the prompt's.
        for kind in ["lora", "lyco"] {
            let ours_kind = ours
                .loras
                .iter()
                .filter(|l| l.tag.starts_with(&format!("<{kind}:")));
            let peer_kind = peer_loras.iter().filter(|n| n["kind"] == kind);
            for (lora, peer) in ours_kind.zip(peer_kind) {
                let expected = &peer["lora"];
                assert_eq!(lora.name, expected["name"].as_str().unwrap(), "{prompt:?}");
                assert_eq!(lora.te_weight.to_bits(), weight(&expected["te"]).to_bits());
                assert_eq!(
                    lora.unet_weight.to_bits(),
                    weight(&expected["unet"]).to_bits()
                );
                assert_eq!(lora.dyn_dim, expected["dyn"].as_u64().map(|d| d as usize));
                let items = str_list(&peer["items"]).join(":");
                assert_eq!(lora.tag, format!("<{kind}:{items}>"));
            }
        }
        for (other, peer) in ours.others.iter().zip(&peer_others) {
            assert_eq!(other.kind, peer["kind"].as_str().unwrap());
            assert_eq!(other.args, str_list(&peer["items"]));
        }
    }
}

#[test]
fn lbw_is_parsed_with_the_block_weight_parser() {
    let parsed = parse_extra_networks("<lora:a:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>").unwrap();
    let expected: Vec<f32> = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(
        parsed.loras[0].block_weights,
        Some(BlockWeightSpec::Values(expected))
    );
    let err = parse_extra_networks("<lora:a:1:lbw=1,2>")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("<lora:a:1:lbw=1,2>: lbw=1,2: 2 weights;"),
        "{err}"
    );
}

#[test]
fn bad_lora_tags_are_one_line_errors() {
    let message = |prompt: &str| parse_extra_networks(prompt).unwrap_err().to_string();
    assert_eq!(
        message("a <lora:x:abc> b"),
        "<lora:x:abc>: text-encoder weight 'abc' is not a finite number"
    );
    assert_eq!(
        message("<lora:x:1:high>"),
        "<lora:x:1:high>: UNet weight 'high' is not a finite number"
    );
    assert_eq!(
        message("<lora:x:te=1e999>"),
        "<lora:x:te=1e999>: te= '1e999' is not a finite number"
    );
    assert_eq!(
        message("<lora:te=0.5>"),
        "<lora:te=0.5>: no LoRA name (the first argument without '=')"
    );
    assert_eq!(
        message("<lora:x:1:1:-4>"),
        "<lora:x:1:1:-4>: dyn '-4' is not a whole number ≥ 0"
    );
    for message in [message("<lora:x:abc>"), message("<lora:x:1:lbw=R>")] {
        assert!(!message.contains('\n'), "{message}");
    }
}

fn embeddings(meta: &Value) -> Vec<TextualInversion> {
    meta["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| TextualInversion {
            name: e[0].as_str().unwrap().to_string(),
            vectors: e[1].as_u64().unwrap() as usize,
        })
        .collect()
}

#[test]
fn chunks_equal_a1111_tokenize_line() {
    let tokenizer = ClipTokenizer::new().unwrap();
    let (meta, cases) = cases("chunks.json");
    assert_eq!(meta["comma_padding_backtrack"], 20);
    let embeddings = embeddings(&meta);
    let mut compared = 0;
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let padding = match case["encoder"].as_str().unwrap() {
            "clip_l" => ClipPadding::EndOfText,
            _ => ClipPadding::Zero,
        };
        let pieces = parse_emphasis(prompt).unwrap();
        let ours = tokenizer
            .chunk(&pieces, &embeddings, &ChunkOptions::a1111(padding))
            .unwrap();
        let peer_chunks = case["chunks"].as_array().unwrap();
        if padding == ClipPadding::Zero && prompt.contains("<|endoftext|>") {
            // open_clip reads "<|endoftext|>" as text (see the tokenizer test).
            assert_ne!(ours.chunks[0].tokens, ids(&peer_chunks[0]["tokens"]));
            continue;
        }
        assert_eq!(
            ours.token_count as u64,
            case["token_count"].as_u64().unwrap(),
            "{prompt:?}"
        );
        assert_eq!(ours.chunks.len(), peer_chunks.len(), "{prompt:?}");
        for (n, (chunk, peer)) in ours.chunks.iter().zip(peer_chunks).enumerate() {
            assert_eq!(chunk.tokens.len(), WINDOW_LENGTH);
            assert_eq!(chunk.tokens, ids(&peer["tokens"]), "{prompt:?} chunk {n}");
            let multipliers: Vec<u64> = peer["multipliers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| weight(m).to_bits())
                .collect();
            let ours_multipliers: Vec<u64> =
                chunk.multipliers.iter().map(|m| m.to_bits()).collect();
            assert_eq!(ours_multipliers, multipliers, "{prompt:?} chunk {n}");
            let fixes: Vec<(u64, String)> = chunk
                .embeddings
                .iter()
                .map(|slot| {
                    // A1111's offset counts from the first token after the start token.
                    (
                        slot.position as u64 - 1,
                        embeddings[slot.embedding].name.clone(),
                    )
                })
                .collect();
            let peer_fixes: Vec<(u64, String)> = peer["fixes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f[0].as_u64().unwrap(), f[1].as_str().unwrap().to_string()))
                .collect();
            assert_eq!(fixes, peer_fixes, "{prompt:?} chunk {n}");
        }
        compared += 1;
    }
    assert_eq!(compared, cases.len() - 1);
}

#[test]
fn embedding_names_without_tokens_are_refused() {
    let tokenizer = ClipTokenizer::new().unwrap();
    let blank = TextualInversion {
        name: "  ".into(),
        vectors: 2,
    };
    let err = tokenizer
        .chunk(&[], &[blank], &ChunkOptions::a1111(ClipPadding::EndOfText))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "embedding name '  ' has no tokens, so no prompt can name it"
    );
}
