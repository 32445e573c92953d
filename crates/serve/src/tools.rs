//! Tool calls in the Hermes convention that Qwen's and many open chat templates use: the tools
//! are described to the model in the system prompt inside `<tools></tools>`, and the model
//! answers a call as `<tool_call>{"name": …, "arguments": {…}}</tool_call>`. With
//! `tool_choice: "required"` or a named function the answer is constrained to such a call's
//! JSON (a grammar over the tools' parameter schemas), so it always parses.

use crate::constrain::Constraint;
use nuwa_hf::Message;
use serde_json::{json, Value};

/// What a request's `tools` and `tool_choice` ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    /// The `function` objects of the tools offered.
    pub functions: Vec<Value>,
    /// The answer must be a call (`required`, or a named function): it is the call's JSON.
    pub forced: bool,
}

/// Tools in play and, when a call is forced, the grammar of its JSON.
pub type Offered = (ToolUse, Option<Constraint>);

/// Reads `tools` and `tool_choice`; `Ok(None)` when no tools are in play (none given, or
/// `tool_choice: "none"`). `Err` is `(field, message)`.
pub fn read(
    body: &serde_json::Map<String, Value>,
) -> Result<Option<Offered>, (&'static str, String)> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(("tools", "`tools` must be a list".into())),
    };
    let mut functions = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let f = t.get("function").filter(|_| t["type"] == "function");
        match f.and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if !name.is_empty() => functions.push(f.cloned().unwrap_or_default()),
            _ => {
                return Err((
                    "tools",
                    format!(
                    "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                ),
                ))
            }
        }
    }
    if functions.is_empty() {
        return Ok(None);
    }
    let named = |name: &str| functions.iter().find(|f| f["name"] == name).cloned();
    let choice = body.get("tool_choice").cloned().unwrap_or(Value::Null);
    let forced: Vec<Value> = match &choice {
        Value::Null => Vec::new(),
        Value::String(s) if s == "auto" => Vec::new(),
        Value::String(s) if s == "none" => return Ok(None),
        Value::String(s) if s == "required" => functions.clone(),
        Value::Object(_) => {
            let name = choice["function"]["name"].as_str().unwrap_or_default();
            match named(name) {
                Some(f) => vec![f],
                None => {
                    return Err((
                        "tool_choice",
                        format!("tool_choice names `{name}`, which is not one of `tools`"),
                    ))
                }
            }
        }
        _ => {
            return Err((
                "tool_choice",
                "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
            ))
        }
    };
    let constraint = (!forced.is_empty()).then(|| Constraint::JsonSchema(call_schema(&forced)));
    Ok(Some((
        ToolUse {
            functions,
            forced: constraint.is_some(),
        },
        constraint,
    )))
}

/// The JSON schema of one call of any of `functions`.
fn call_schema(functions: &[Value]) -> Value {
    let one = |f: &Value| {
        let params = f
            .get("parameters")
            .cloned()
            .unwrap_or(json!({"type": "object"}));
        json!({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
               "required": ["name", "arguments"], "additionalProperties": false})
    };
    match functions {
        [f] => one(f),
        many => json!({"anyOf": many.iter().map(one).collect::<Vec<_>>()}),
    }
}

/// The system prompt text that offers the tools (appended to the conversation's system message,
/// or a system message of its own at the start).
pub fn offer(messages: &mut Vec<Message>, tools: &ToolUse) {
    let list: Vec<String> = tools
        .functions
        .iter()
        .map(|f| json!({"type": "function", "function": f}).to_string())
        .collect();
    let text = format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\n\
         For each function call, return a json object with function name and arguments within \
         <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        list.join("\n")
    );
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
        _ => messages.insert(
            0,
            Message {
                role: "system".into(),
                content: text,
            },
        ),
    }
}

/// A conversation message as the template sees it: an assistant's earlier calls written back as
/// `<tool_call>` blocks, a tool's result as a user turn inside `<tool_response>`.
pub fn history_message(role: &str, content: String, calls: Option<&Value>) -> Message {
    match (role, calls.and_then(Value::as_array)) {
        ("tool", _) => Message {
            role: "user".into(),
            content: format!("<tool_response>\n{content}\n</tool_response>"),
        },
        ("assistant", Some(calls)) => {
            let mut text = content;
            for c in calls {
                let f = &c["function"];
                let arguments = match &f["arguments"] {
                    Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                    other => other.clone(),
                };
                let call = json!({"name": f["name"], "arguments": arguments});
                text.push_str(&format!("\n<tool_call>\n{call}\n</tool_call>"));
            }
            Message {
                role: role.into(),
                content: text.trim_start().to_string(),
            }
        }
        _ => Message {
            role: role.into(),
            content,
        },
    }
}

/// The calls in a model's answer and the text around them. A forced answer is one call's JSON;
/// otherwise every `<tool_call>…</tool_call>` block whose JSON names an offered function.
pub fn parse(text: &str, tools: &ToolUse, first_id: u64) -> (String, Vec<Value>) {
    let mut calls = Vec::new();
    let mut rest = String::new();
    // The arguments are passed on as the model wrote them (re-serialising would turn a large
    // integer into a float).
    #[derive(serde::Deserialize)]
    struct Call<'a> {
        name: String,
        #[serde(borrow)]
        arguments: Option<&'a serde_json::value::RawValue>,
    }
    let push = |text: &str, calls: &mut Vec<Value>| -> bool {
        let Ok(call) = serde_json::from_str::<Call>(text) else {
            return false;
        };
        let name = call.name;
        if !tools.functions.iter().any(|f| f["name"] == name.as_str()) {
            return false;
        }
        let arguments = call
            .arguments
            .map_or("{}".to_string(), |a| a.get().to_string());
        calls.push(
            json!({"id": format!("call_{}", first_id + calls.len() as u64), "type": "function",
                          "function": {"name": name, "arguments": arguments}}),
        );
        true
    };
    if tools.forced {
        if push(text.trim(), &mut calls) {
            return (String::new(), calls);
        }
        return (text.to_string(), calls);
    }
    let mut s = text;
    while let Some(start) = s.find("<tool_call>") {
        rest.push_str(&s[..start]);
        let after = &s[start + "<tool_call>".len()..];
        let (body, next) = match after.find("</tool_call>") {
            Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
            None => (after, ""),
        };
        if !push(body.trim(), &mut calls) {
            rest.push_str(&s[start..s.len() - next.len()]);
        }
        s = next;
    }
    rest.push_str(s);
    (rest.trim().to_string(), calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(forced: bool) -> ToolUse {
        ToolUse {
            functions: vec![json!({"name": "get_weather", "parameters": {"type": "object"}})],
            forced,
        }
    }

    #[test]
    fn calls_are_parsed_from_tags_and_unknown_names_stay_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Hangzhou\"}}\n</tool_call>\n<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>";
        let (rest, calls) = parse(text, &tools(false), 0);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Hangzhou"}));
        assert!(
            rest.starts_with("Let me check.") && rest.contains("nope"),
            "{rest}"
        );
    }

    #[test]
    fn a_forced_answer_is_the_call_itself() {
        let (rest, calls) = parse(
            r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#,
            &tools(true),
            3,
        );
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0]["id"], "call_3");
    }

    #[test]
    fn tool_choice_is_read_and_checked() {
        let body = |v: Value| v.as_object().cloned().unwrap();
        let t = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let (use_, c) = read(&body(json!({"tools": t, "tool_choice": "required"})))
            .unwrap()
            .unwrap();
        assert!(use_.forced && c.is_some());
        assert!(read(&body(json!({"tools": t, "tool_choice": "none"})))
            .unwrap()
            .is_none());
        let (_, c) = read(&body(json!({"tools": t}))).unwrap().unwrap();
        assert!(c.is_none());
        let err = read(&body(
            json!({"tools": t, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
        ))
        .unwrap_err();
        assert_eq!(err.0, "tool_choice");
        assert_eq!(
            read(&body(json!({"tools": [{"type": "x"}]})))
                .unwrap_err()
                .0,
            "tools"
        );
    }
}
