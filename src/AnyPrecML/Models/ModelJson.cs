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
        try { return JsonNode.Parse(text, documentOptions: Options); }
        catch (JsonException e) { throw Invalid(path, problem, e); }
    }

    /// <summary>A format error for <paramref name="e"/>; the parser's message quotes the bad input, whose line breaks and control characters are escaped.</summary>
    public static ModelFormatException Invalid(string path, string problem, JsonException e) =>
        new($"{path}: {problem}: {OneLine(e.Message)}", e);

    private static string OneLine(string s) =>
        string.Concat(s.Select(c => char.IsControl(c) ? $"\\u{(int)c:x4}" : c.ToString()));
}
