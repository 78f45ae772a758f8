using System.Text.Json;
using System.Text.Json.Nodes;

namespace AnyPrecML.Models;

/// <summary>How the JSON files of a model (config.json, the safetensors header and index) are parsed.</summary>
internal static class ModelJson
{
    /// <summary>A key given twice is an error: JsonObject would otherwise throw a .NET ArgumentException on first use (found by fuzzing).</summary>
    public static readonly JsonDocumentOptions Options = new() { AllowDuplicateProperties = false };

    /// <summary>The JSON of <paramref name="path"/>; invalid JSON is a <see cref="ModelFormatException"/> "path: &lt;problem&gt;: ..." on one line.</summary>
    public static JsonNode? Parse(string path, string problem = "not valid JSON")
    {
        string text = File.ReadAllText(path);
        using (ParseDocument(path, () => JsonDocument.Parse(text, Options), problem)) { }
        return JsonNode.Parse(text, documentOptions: Options);
    }

    /// <summary>
    /// The document <paramref name="parse"/> returns, with every key and string decoded once. An escaped lone surrogate ("\udc00") is
    /// valid JSON that no .NET string can hold: JsonDocument's duplicate-key check, JsonElement.GetString and JsonNode
    /// throw InvalidOperationException on it at first use, wherever that is (found by fuzzing). Here it is a format error.
    /// </summary>
    public static JsonDocument ParseDocument(string path, Func<JsonDocument> parse, string problem)
    {
        JsonDocument? doc = null;
        try
        {
            doc = parse();
            CheckStrings(doc.RootElement);
            return doc;
        }
        catch (JsonException e) { doc?.Dispose(); throw Invalid(path, problem, e); }
        catch (InvalidOperationException e) { doc?.Dispose(); throw new ModelFormatException($"{path}: {problem}: a key or string is not valid Unicode ({OneLine(e.Message)})", e); }
    }

    private static void CheckStrings(JsonElement e)
    {
        switch (e.ValueKind)
        {
            case JsonValueKind.Object:
                foreach (var p in e.EnumerateObject()) { _ = p.Name; CheckStrings(p.Value); }
                break;
            case JsonValueKind.Array:
                foreach (var item in e.EnumerateArray()) CheckStrings(item);
                break;
            case JsonValueKind.String:
                _ = e.GetString();
                break;
        }
    }

    /// <summary>A format error for <paramref name="e"/>; the parser's message quotes the bad input, whose line breaks and control characters are escaped.</summary>
    public static ModelFormatException Invalid(string path, string problem, JsonException e) =>
        new($"{path}: {problem}: {OneLine(e.Message)}", e);

    private static string OneLine(string s) =>
        string.Concat(s.Select(c => char.IsControl(c) ? $"\\u{(int)c:x4}" : c.ToString()));
}
