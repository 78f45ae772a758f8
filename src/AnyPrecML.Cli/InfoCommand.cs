using System.CommandLine;
using System.Text.Json.Nodes;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec info`: what a model is, without loading its weights.</summary>
internal static class InfoCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        model.Description = "A llama2.c .bin file, a Hugging Face model directory or an any-precision directory.";
        var json = CommonOptions.Json();
        var command = new Command("info", "Show a model's format, shape and tensors; for an any-precision directory also its widths, sensitivity, calibration and bytes per width.") { model, json };
        command.SetAction(r =>
        {
            string path = r.GetValue(model)!;
            if (Directory.Exists(path) && LlamaCheckpoint.IsAnyPrecision(path)) return AnyPrecision(r, path, r.GetValue(json));
            using var cp = LlamaCheckpoint.Open(path);
            var info = Shape(cp);
            if (r.GetValue(json)) { r.WriteJson(info); return 0; }
            WriteShape(r.Out(), cp, $"{cp.SourcePath} ({cp.Format})");
            return 0;
        });
        return command;
    }

    private static JsonObject Shape(LlamaCheckpoint cp)
    {
        var c = cp.Config;
        return new JsonObject
        {
            ["path"] = cp.SourcePath, ["format"] = cp.Format.ToString(),
            ["dim"] = c.Dim, ["hidden_dim"] = c.HiddenDim, ["n_layers"] = c.Layers, ["n_heads"] = c.Heads, ["n_kv_heads"] = c.KvHeads,
            ["head_dim"] = c.HeadDim, ["vocab_size"] = c.VocabSize, ["max_seq_len"] = c.MaxSeqLen,
            ["rms_norm_eps"] = c.RmsNormEps, ["rope_theta"] = c.RopeTheta, ["rope_layout"] = c.RopeLayout.ToString(),
            ["tied_embeddings"] = c.TiedEmbeddings, ["parameters"] = c.ParameterCount,
            ["tensors"] = cp.TensorNames.Count,
            ["dtypes"] = new JsonArray([.. Dtypes(cp).Select(d => (JsonNode)d)]),
            ["tokenizer"] = cp.TokenizerPath,
        };
    }

    private static string[] Dtypes(LlamaCheckpoint cp) => cp.TensorNames.Select(n => cp[n].DType.Name()).Distinct().Order().ToArray();

    private static void WriteShape(TextWriter o, LlamaCheckpoint cp, string title)
    {
        var c = cp.Config;
        o.WriteLine(title);
        o.WriteLine($"  dim {c.Dim}, hidden {c.HiddenDim}, layers {c.Layers}, heads {c.Heads} (kv {c.KvHeads}, head dim {c.HeadDim})");
        o.WriteLine($"  vocab {c.VocabSize}, context {c.MaxSeqLen}, rope theta {c.RopeTheta} ({c.RopeLayout}), rms eps {c.RmsNormEps}");
        o.WriteLine($"  {c.ParameterCount:N0} parameters in {cp.TensorNames.Count} tensors ({string.Join(", ", Dtypes(cp))}), head {(c.TiedEmbeddings ? "tied to the embedding" : "separate")}");
        o.WriteLine($"  tokenizer: {cp.TokenizerPath ?? "(none beside the model)"}");
    }

    /// <summary>What the format does not record, said rather than guessed.</summary>
    private static readonly string[] NotRecorded = ["the source model (path or hash)", "when it was quantized and how long it took"];

    /// <summary>
    /// An any-precision directory: the recorded quantization settings and, per width b, the bytes a b-bit model reads
    /// (planes 0..b-1 and the b-bit tables, plus the unquantized tensors), beside the one parent that serves them all.
    /// </summary>
    private static int AnyPrecision(ParseResult r, string path, bool json)
    {
        using var ap = AnyPrecisionModel.Open(path);
        var section = (JsonNode.Parse(File.ReadAllText(Path.Combine(path, "config.json")))!["anyprecision"] as JsonObject)!;
        long unquantized = ap.UnquantizedBytes, parent = ap.StoredBytes;
        var widths = ap.SupportedBits.Select(b => { var (planes, table) = ap.LinearBytes(b); return (Bits: b, Planes: planes, Table: table, Model: planes + table + unquantized); }).ToArray();
        long separate = widths.Sum(w => w.Model);
        string? seedMethod = section["seed_method"]?.GetValue<string>();
        int version = ap.FormatVersion;
        if (json)
        {
            var info = Shape(ap.Checkpoint);
            info["format"] = "AnyPrecision";
            info["format_version"] = version;
            info["current_format_version"] = AnyPrecisionQuantizer.FormatVersion;
            info["seed_bits"] = ap.SeedBits;
            info["parent_bits"] = ap.ParentBits;
            info["widths"] = new JsonArray([.. ap.SupportedBits.Select(b => (JsonNode)b)]);
            info["seed_method"] = seedMethod;
            info["sensitivity"] = ap.SensitivityKind;
            info["calibration"] = ap.Calibration?.DeepClone();
            info["not_recorded"] = new JsonArray([.. NotRecorded.Select(s => (JsonNode)s)]);
            info["bytes"] = new JsonObject
            {
                ["per_width"] = new JsonArray([.. widths.Select(w => (JsonNode)new JsonObject { ["bits"] = w.Bits, ["planes"] = w.Planes, ["table"] = w.Table, ["model"] = w.Model })]),
                ["unquantized"] = unquantized,
                ["parent"] = parent,
                ["separate_models"] = separate,
            };
            r.WriteJson(info);
            return 0;
        }
        var o = r.Out();
        WriteShape(o, ap.Checkpoint, $"{path} (any-precision, format version {version})");
        o.WriteLine($"  widths {ap.SeedBits}..{ap.ParentBits}: one {ap.ParentBits}-bit parent, seed {ap.SeedBits} bits ({seedMethod ?? "seed method not recorded (format 1)"})");
        o.WriteLine($"  sensitivity {ap.SensitivityKind}; calibration: "
            + (ap.Calibration is null ? "none (uniform weights need none)" : string.Join(", ", ap.Calibration.Select(kv => $"{kv.Key} {kv.Value?.ToJsonString(AnyPrecML.MLNet.Scoring.JsonLines.Json).Trim('"')}"))));
        o.WriteLine($"  not recorded by the format: {string.Join("; ", NotRecorded)}");
        if (version < AnyPrecisionQuantizer.FormatVersion)
            o.WriteLine($"  format {version}: `anyprec repack --model {path} --output DIR` rewrites it in format {AnyPrecisionQuantizer.FormatVersion} (the same weights, planes padded apart: faster products on CPUs whose L2 their spacing defeats)");
        o.WriteLine();
        o.WriteLine("| bits | planes 0..b-1 | b-bit table | b-bit model (+ unquantized) |");
        o.WriteLine("|---:|---:|---:|---:|");
        foreach (var w in widths) o.WriteLine($"| {w.Bits} | {w.Planes:N0} | {w.Table:N0} | {w.Model:N0} |");
        o.WriteLine();
        o.WriteLine($"unquantized tensors (embedding, norms{(ap.Config.TiedEmbeddings ? "" : ", head")}): {unquantized:N0} bytes, read by every width");
        o.WriteLine($"one {ap.ParentBits}-bit parent serving {ap.SeedBits}..{ap.ParentBits}: {parent:N0} bytes; separate {ap.SeedBits}..{ap.ParentBits}-bit models: {separate:N0} bytes ({100.0 * parent / separate:F0}% of their sum)");
        return 0;
    }
}
