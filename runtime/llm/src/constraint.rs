//! Constrained decoding: a JSON schema, a choice among strings or a regex is
//! compiled by llguidance into a matcher that masks, at every step, the
//! tokens that cannot continue a valid output.

use crate::tokenizer::Tokenizer;
use crate::types::{Constraint, LlmError};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

struct TokenEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode_plain(&String::from_utf8_lossy(s))
            .unwrap_or_default()
    }
}

/// Built once per model: the token trie and the grammar compiler.
pub struct Constraints {
    factory: ParserFactory,
}

impl Constraints {
    /// Builds the token trie of the model's vocabulary and the grammar
    /// compiler; done once at load, as it walks every token.
    ///
    /// # Errors
    ///
    /// llguidance's message when it cannot build the compiler for this
    /// vocabulary.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Constraints, String> {
        let mut info = TokRxInfo::new(tokenizer.vocab_size() as u32, tokenizer.eos);
        info.tok_bos = tokenizer.bos;
        let trie = TokTrie::from(&info, tokenizer.pieces());
        let env: llguidance::toktrie::TokEnv = Arc::new(TokenEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Constraints { factory })
    }

    /// A matcher for one generation, or `None` without a constraint.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a schema that is not JSON, a regex that does not
    /// parse, or a choice with no choices; `ConstraintUnsatisfiable` when
    /// llguidance cannot compile the grammar.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Option<Matcher>, LlmError> {
        let grammar = match constraint {
            Constraint::None => return Ok(None),
            Constraint::JsonSchema(schema) => {
                let mut schema: serde_json::Value = serde_json::from_str(schema)
                    .map_err(|e| LlmError::InvalidInput(format!("JSON schema is not JSON: {e}")))?;
                // Compact JSON unless the schema says otherwise: a small model
                // must not be able to spend its token budget on whitespace.
                if let Some(obj) = schema.as_object_mut()
                    && !obj.contains_key("x-guidance")
                {
                    obj.insert(
                        "x-guidance".into(),
                        serde_json::json!({ "whitespace_flexible": false }),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(LlmError::InvalidInput(
                        "choice constraint with no choices".into(),
                    ));
                }
                let rx = choices
                    .iter()
                    .map(|c| regex_syntax::escape(c))
                    .collect::<Vec<_>>()
                    .join("|");
                TopLevelGrammar::from_regex(&format!("(?:{rx})"))
            }
            Constraint::Regex(rx) => {
                regex_syntax::Parser::new()
                    .parse(rx)
                    .map_err(|e| LlmError::InvalidInput(format!("regex: {e}")))?;
                TopLevelGrammar::from_regex(rx)
            }
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| LlmError::ConstraintUnsatisfiable(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(LlmError::ConstraintUnsatisfiable(e));
        }
        Ok(Some(matcher))
    }
}
