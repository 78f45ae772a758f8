using System.Text;
using System.Text.Json;
using Microsoft.Extensions.AI;

namespace AnyPrecML.AI;

/// <summary>
/// How a conversation becomes one prompt. The common families are recognised from the Jinja source in
/// tokenizer_config.json's <c>chat_template</c> by their marker tokens and written out here in C#, so no Jinja
/// engine is needed; a model without a template (a base model such as stories260K) gets <see cref="Plain"/>.
/// The leading BOS is left out of every template: the generator adds the BOS token itself.
/// </summary>
public sealed class ChatTemplate
{
    private readonly Func<IReadOnlyList<(string Role, string Text)>, string> _format;

    private ChatTemplate(string name, string? endOfTurn, Func<IReadOnlyList<(string Role, string Text)>, string> format)
    {
        Name = name;
        EndOfTurn = endOfTurn;
        _format = format;
    }

    /// <summary>The template's name: plain, llama2, llama3, chatml or zephyr.</summary>
    public string Name { get; }

    /// <summary>The text that closes the assistant's turn (a stop sequence), or null for <see cref="Plain"/>.</summary>
    public string? EndOfTurn { get; }

    /// <summary>A base model's transcript: the messages' texts one per line, no roles; the model continues the text.</summary>
    public static ChatTemplate Plain { get; } = new("plain", null, m => string.Join('\n', m.Select(x => x.Text).Where(t => t.Length > 0)));

    /// <summary>Llama 2 chat: <c>[INST] &lt;&lt;SYS&gt;&gt;…&lt;&lt;/SYS&gt;&gt; user [/INST] assistant &lt;/s&gt;&lt;s&gt;[INST] …</c>.</summary>
    public static ChatTemplate Llama2 { get; } = new("llama2", "</s>", FormatLlama2);

    /// <summary>Llama 3 instruct: <c>&lt;|start_header_id|&gt;role&lt;|end_header_id|&gt;\n\ntext&lt;|eot_id|&gt;</c> per message.</summary>
    public static ChatTemplate Llama3 { get; } = new("llama3", "<|eot_id|>", m => Turns(m, x => $"<|start_header_id|>{x.Role}<|end_header_id|>\n\n{x.Text}<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"));

    /// <summary>ChatML (Qwen, TinyLlama chat v0.x, many fine-tunes): <c>&lt;|im_start|&gt;role\ntext&lt;|im_end|&gt;\n</c> per message.</summary>
    public static ChatTemplate ChatML { get; } = new("chatml", "<|im_end|>", m => Turns(m, x => $"<|im_start|>{x.Role}\n{x.Text}<|im_end|>\n", "<|im_start|>assistant\n"));

    /// <summary>Zephyr (TinyLlama chat v1.0): <c>&lt;|role|&gt;\ntext&lt;/s&gt;\n</c> per message.</summary>
    public static ChatTemplate Zephyr { get; } = new("zephyr", "</s>", m => Turns(m, x => $"<|{x.Role}|>\n{x.Text}</s>\n", "<|assistant|>\n"));

    /// <summary>Every template, by name.</summary>
    public static IReadOnlyList<ChatTemplate> All { get; } = [Plain, Llama2, Llama3, ChatML, Zephyr];

    /// <summary>The template called <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">No template has that name.</exception>
    public static ChatTemplate Named(string name) =>
        All.FirstOrDefault(t => string.Equals(t.Name, name, StringComparison.OrdinalIgnoreCase))
        ?? throw new ArgumentException($"unknown chat template '{name}'; known: {string.Join(", ", All.Select(t => t.Name))}.", nameof(name));

    /// <summary>
    /// The family of a Jinja <c>chat_template</c>, recognised by its marker tokens; <see cref="Plain"/> when it is
    /// null or empty. Markers are tested from the most specific (Llama 3's headers) to the least (Llama 2's [INST]).
    /// </summary>
    /// <exception cref="NotSupportedException">A template is given but belongs to none of the known families.</exception>
    public static ChatTemplate Detect(string? jinja)
    {
        if (string.IsNullOrWhiteSpace(jinja)) return Plain;
        if (jinja.Contains("<|start_header_id|>", StringComparison.Ordinal)) return Llama3;
        if (jinja.Contains("<|im_start|>", StringComparison.Ordinal)) return ChatML;
        if (jinja.Contains("<|user|>", StringComparison.Ordinal) || jinja.Contains("'<|' + message['role'] + '|>'", StringComparison.Ordinal)) return Zephyr;
        if (jinja.Contains("[INST]", StringComparison.Ordinal)) return Llama2;
        throw new NotSupportedException("the model's chat_template is none of llama2, llama3, chatml or zephyr; choose one explicitly (or plain).");
    }

    /// <summary>The template of the model in <paramref name="modelDirectory"/>: from its tokenizer_config.json, else <see cref="Plain"/>.</summary>
    public static ChatTemplate FromModelDirectory(string modelDirectory)
    {
        string path = Path.Combine(modelDirectory, "tokenizer_config.json");
        if (!File.Exists(path)) return Plain;
        using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
        // chat_template is a string, or a list of named templates of which "default" is the chat one.
        string? jinja = doc.RootElement.TryGetProperty("chat_template", out var t) ? t.ValueKind switch
        {
            JsonValueKind.String => t.GetString(),
            JsonValueKind.Array => t.EnumerateArray().Where(x => x.TryGetProperty("name", out var n) && n.GetString() == "default")
                .Select(x => x.GetProperty("template").GetString()).FirstOrDefault(),
            _ => null,
        } : null;
        return Detect(jinja);
    }

    /// <summary>The prompt for <paramref name="messages"/>, ending where the assistant's reply begins.</summary>
    public string Format(IEnumerable<ChatMessage> messages)
    {
        ArgumentNullException.ThrowIfNull(messages);
        return _format([.. messages.Select(m => (m.Role.Value, m.Text ?? ""))]);
    }

    /// <inheritdoc/>
    public override string ToString() => Name;

    private static string Turns(IReadOnlyList<(string Role, string Text)> messages, Func<(string Role, string Text), string> turn, string assistantStart)
    {
        var s = new StringBuilder();
        foreach (var m in messages) s.Append(turn(m));
        return s.Append(assistantStart).ToString();
    }

    private static string FormatLlama2(IReadOnlyList<(string Role, string Text)> messages)
    {
        // Llama 2 folds the system prompt into the first user turn; each exchange is its own [INST] block.
        var s = new StringBuilder();
        string? system = null;
        bool first = true;
        foreach (var (role, text) in messages)
        {
            if (role == "system") { system = text; continue; }
            if (role == "assistant") { s.Append(' ').Append(text.Trim()).Append(" </s>"); continue; }
            if (!first) s.Append("<s>");
            s.Append("[INST] ");
            if (system is not null) { s.Append("<<SYS>>\n").Append(system).Append("\n<</SYS>>\n\n"); system = null; }
            s.Append(text.Trim()).Append(" [/INST]");
            first = false;
        }
        return s.ToString();
    }
}
