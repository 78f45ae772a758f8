using System.Text.Json;
using System.Text.Json.Nodes;

namespace AnyPrecML.MLNet.Scoring;

/// <summary>The one JSON-lines writer of the CLI and the batch scorers: compact, relaxed escaping, non-finite numbers marked.</summary>
internal static class JsonLines
{
    /// <summary>
    /// Serializes <paramref name="value"/> as one line of JSON. A non-finite number (NaN, ±Inf: a diverged model, an
    /// empty text's perplexity) is not valid JSON: it is written as null with a sibling "&lt;name&gt;_reason" saying what it was.
    /// </summary>
    public static string Format(object value)
    {
        var node = JsonSerializer.SerializeToNode(value, JsonWithMarkedNonFinite);
        return node is null ? "null" : ReplaceNonFinite(node).ToJsonString(Json);
    }

    // Relaxed escaping: the output is read as JSON, never embedded in HTML, so quotes and non-ASCII text stay readable.
    internal static readonly JsonSerializerOptions Json = new() { WriteIndented = false, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
    private static readonly JsonSerializerOptions JsonWithMarkedNonFinite = new() { WriteIndented = false, Encoder = Json.Encoder, Converters = { new NonFiniteMarker<double>(), new NonFiniteMarker<float>() } };

    // Private-use code point: no number serializes to it and no text the CLI prints starts with it.
    private const string NonFiniteMark = "\uE000non-finite:";

    private sealed class NonFiniteMarker<T> : System.Text.Json.Serialization.JsonConverter<T> where T : System.Numerics.IFloatingPointIeee754<T>
    {
        public override T Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) => throw new NotSupportedException();

        public override void Write(Utf8JsonWriter writer, T value, JsonSerializerOptions options)
        {
            if (T.IsFinite(value)) writer.WriteRawValue(value.ToString("R", System.Globalization.CultureInfo.InvariantCulture));
            else writer.WriteStringValue(NonFiniteMark + (T.IsNaN(value) ? "NaN" : T.IsNegative(value) ? "-Infinity" : "Infinity"));
        }
    }

    private static JsonNode ReplaceNonFinite(JsonNode node)
    {
        static string? Marked(JsonNode? n) => n is JsonValue v && v.TryGetValue<string>(out var s) && s.StartsWith(NonFiniteMark, StringComparison.Ordinal) ? s[NonFiniteMark.Length..] : null;
        static string Reason(string what) => $"not a finite number ({what})";
        if (node is JsonObject o)
            foreach (var (name, child) in o.ToList())
            {
                if (Marked(child) is { } what) { o[name] = null; o[name + "_reason"] = Reason(what); }
                else if (child is JsonArray a)
                {
                    var reasons = new List<string>();
                    for (int i = 0; i < a.Count; i++)
                        if (Marked(a[i]) is { } w) { a[i] = null; reasons.Add($"[{i}]: {Reason(w)}"); }
                        else if (a[i] is { } item) ReplaceNonFinite(item);
                    if (reasons.Count > 0) o[name + "_reason"] = string.Join("; ", reasons);
                }
                else if (child is not null) ReplaceNonFinite(child);
            }
        return node;
    }
}
