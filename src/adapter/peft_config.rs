//! The peft `LoraConfig` that decides alpha and rsLoRA for lora_A/lora_B files: diffusers embeds it
//! as the `lora_adapter_metadata` JSON (keys prefixed by component: `unet.lora_alpha`), peft's own
//! `save_pretrained` writes `adapter_config.json` beside `adapter_model.safetensors`.

use crate::family::Component;
use crate::tensors::TensorFile;
use crate::{Error, Result};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default)]
pub struct PeftConfig {
    /// Config per component prefix (`unet`, `text_encoder`, …); `""` holds unprefixed keys.
    sections: Vec<(String, Map<String, Value>)>,
}

impl PeftConfig {
    /// Finds the config of a file: embedded metadata first, then a sibling adapter_config.json.
    pub fn find(file: &TensorFile) -> Result<Option<PeftConfig>> {
        if let Some(text) = file.metadata().get("lora_adapter_metadata") {
            let v: Value = serde_json::from_str(text).map_err(|e| {
                Error::bad_file(
                    file.path(),
                    format!("lora_adapter_metadata is not valid JSON: {e}"),
                )
            })?;
            let obj = v.as_object().ok_or_else(|| {
                Error::bad_file(file.path(), "lora_adapter_metadata is not a JSON object")
            })?;
            return Ok(Some(PeftConfig::from_flat(obj)));
        }
        let sibling = file.path().with_file_name("adapter_config.json");
        if file
            .path()
            .file_stem()
            .is_some_and(|s| s.to_string_lossy().starts_with("adapter_model"))
            && sibling.is_file()
        {
            let text = std::fs::read_to_string(&sibling).map_err(|e| Error::io(&sibling, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&sibling, format!("not valid JSON: {e}")))?;
            if let Some(obj) = v.as_object() {
                return Ok(Some(PeftConfig {
                    sections: vec![(String::new(), obj.clone())],
                }));
            }
        }
        Ok(None)
    }

    /// Splits `{"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": …}` into sections.
    pub fn from_flat(obj: &Map<String, Value>) -> PeftConfig {
        let mut sections: Vec<(String, Map<String, Value>)> = Vec::new();
        for (k, v) in obj {
            let (prefix, field) = match k.rsplit_once('.') {
                Some((p, f)) => (p.to_string(), f.to_string()),
                None => (String::new(), k.clone()),
            };
            match sections.iter_mut().find(|(p, _)| *p == prefix) {
                Some((_, m)) => {
                    m.insert(field, v.clone());
                }
                None => sections.push((prefix, Map::from_iter([(field, v.clone())]))),
            }
        }
        PeftConfig { sections }
    }

    fn section(&self, component: Component) -> Option<&Map<String, Value>> {
        self.sections
            .iter()
            .find(|(p, _)| p == component.name())
            .or_else(|| self.sections.iter().find(|(p, _)| p.is_empty()))
            .map(|(_, m)| m)
    }

    /// `lora_alpha`, or the `alpha_pattern` entry whose key names this module (peft matches a
    /// pattern key against the end of the module path).
    pub fn alpha_for(&self, component: Component, path: &str) -> Option<f32> {
        let sec = self.section(component)?;
        if let Some(pattern) = sec.get("alpha_pattern").and_then(Value::as_object) {
            for (key, value) in pattern {
                let hit = path == key || path.ends_with(&format!(".{key}"));
                if hit {
                    if let Some(a) = value.as_f64() {
                        return Some(a as f32);
                    }
                }
            }
        }
        sec.get("lora_alpha")
            .and_then(Value::as_f64)
            .map(|a| a as f32)
    }

    pub fn use_rslora(&self, component: Component) -> bool {
        self.section(component)
            .and_then(|s| s.get("use_rslora"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}
