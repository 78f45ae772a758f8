using System.Text.Json.Nodes;
using AnyPrecML.Models;

namespace AnyPrecML.Quantization;

/// <summary>Settings of any-precision quantization.</summary>
public sealed record QuantizerOptions
{
    /// <summary>Width of the seed k-means (2^seed centroids per row), 1..8; the paper uses 3.</summary>
    public int SeedBits { get; init; } = 3;
    /// <summary>Parent width n reached by upscaling, seed..8.</summary>
    public int ParentBits { get; init; } = 8;
    /// <summary>How the seed clusters are found: the exact optimum (default) or the k-means++/Lloyd baseline.</summary>
    public SeedMethod SeedMethod { get; init; } = SeedMethod.Exact;
    /// <summary>Seed of the k-means++ starts (<see cref="SeedMethod.KMeans"/>): the same inputs and seed give byte-identical files.</summary>
    public ulong RandomSeed { get; init; } = 0;
    /// <summary>Threads for rows of a layer (0: all cores).</summary>
    public int MaxDegreeOfParallelism { get; init; } = 0;

    /// <summary>Throws <see cref="ArgumentOutOfRangeException"/> unless 1 ≤ seed ≤ parent ≤ 8.</summary>
    public QuantizerOptions Validated()
    {
        if (SeedBits is < 1 or > 8) throw new ArgumentOutOfRangeException(nameof(SeedBits), SeedBits, "seed bits must be in 1..8.");
        if (ParentBits < SeedBits || ParentBits > 8) throw new ArgumentOutOfRangeException(nameof(ParentBits), ParentBits, $"parent bits must be in {SeedBits}..8.");
        return this;
    }
}

/// <summary>Progress of quantization: linear layers done of the total, and the one just finished.</summary>
public readonly record struct QuantizeProgress(int Done, int Total, string Layer);

/// <summary>
/// Quantizes a checkpoint into an any-precision model directory (docs/FORMAT.md). Layers stream
/// from the mapped source one at a time, so memory is bounded by a layer, not the model; rows of a
/// layer run in parallel, each with its own seed derived from (layer, row), so the output does not
/// depend on thread scheduling.
/// </summary>
public static class AnyPrecisionQuantizer
{
    /// <summary>
    /// Format version written to config.json: 3 pads each plane with zero rows (<see cref="BitplaneMatrix.PaddedPlaneRows"/>);
    /// 2 records each linear's shape and the q/k permutation; 1 and 2 are still read.
    /// </summary>
    public const int FormatVersion = 3;

    /// <summary>Quantizes every block linear of <paramref name="source"/> and writes the model to <paramref name="outputDirectory"/>.</summary>
    public static void Quantize(LlamaCheckpoint source, string outputDirectory, ISensitivitySource sensitivity, QuantizerOptions options,
        JsonObject? calibrationSummary = null, IProgress<QuantizeProgress>? progress = null, bool overwrite = false, CancellationToken cancellationToken = default)
    {
        options.Validated();
        var c = source.Config;
        var layers = new List<(int Layer, string Part)>();
        for (int l = 0; l < c.Layers; l++) foreach (var part in LlamaTensorNames.BlockLinears) layers.Add((l, part));

        // The layer being written is held, and the next one is quantized in the background meanwhile, so
        // reading, packing and writing a layer overlap the row work of the next (two layers in memory at most).
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        (int Layer, string Part, BitplaneMatrix Matrix)? current = null;
        (int Index, Task<BitplaneMatrix> Work)? next = null;
        BitplaneMatrix Get(int l, string part)
        {
            if (current is { } cur && cur.Layer == l && cur.Part == part) return cur.Matrix;
            cancellationToken.ThrowIfCancellationRequested();
            int index = layers.IndexOf((l, part));
            var m = next is { } pending && pending.Index == index
                ? pending.Work.GetAwaiter().GetResult()
                : QuantizeLayer(source, l, part, sensitivity, options, stop.Token);
            current = (l, part, m);
            // One thread asked for means no background layer either.
            next = index + 1 < layers.Count && options.MaxDegreeOfParallelism != 1
                ? (index + 1, Task.Run(() => QuantizeLayer(source, layers[index + 1].Layer, layers[index + 1].Part, sensitivity, options, stop.Token)))
                : null;
            progress?.Report(new QuantizeProgress(index + 1, layers.Count, m.Name));
            return m;
        }

        var tensors = new List<TensorToWrite>();
        void Copy(string name)
        {
            var t = source[name];
            tensors.Add(new TensorToWrite(name, t.DType, [.. t.Shape], s => s.Write(source[name].Bytes)));
        }
        Copy(LlamaTensorNames.Embedding);
        for (int l = 0; l < c.Layers; l++)
        {
            Copy(LlamaTensorNames.Layer(l, "input_layernorm"));
            Copy(LlamaTensorNames.Layer(l, "post_attention_layernorm"));
            foreach (var part in LlamaTensorNames.BlockLinears)
            {
                int layer = l;
                var shape = LlamaTensorNames.ShapeOf(c, part);
                long rows = shape[0];
                string name = AnyPrecisionModel.LinearName(l, part);
                tensors.Add(PlanesTensor(name + ".bitplanes", options.ParentBits, (int)rows, (int)shape[1], () => Get(layer, part)));
                for (int b = options.SeedBits; b <= options.ParentBits; b++)
                {
                    int bits = b;
                    tensors.Add(new TensorToWrite($"{name}.centroids.{b}", DType.F16, [rows, 1L << b],
                        s => s.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(Get(layer, part).Table(bits)))));
                }
            }
        }
        Copy(LlamaTensorNames.FinalNorm);
        if (!c.TiedEmbeddings) Copy(LlamaTensorNames.Head);

        var stored = source[LlamaTensorNames.Embedding].DType;
        var config = HuggingFaceExport.ConfigJson(c with { RopeLayout = RopeLayout.HalfSplit }, stored);
        config["anyprecision"] = new JsonObject
        {
            ["format_version"] = FormatVersion,
            ["seed_bits"] = options.SeedBits,
            ["parent_bits"] = options.ParentBits,
            ["seed_method"] = options.SeedMethod == SeedMethod.Exact ? "exact" : "kmeans",
            ["random_seed"] = options.RandomSeed.ToString(),
            ["sensitivity"] = sensitivity.Kind,
            ["calibration"] = calibrationSummary?.DeepClone(),
            ["quantized"] = new JsonArray([.. layers.Select(x => (JsonNode)AnyPrecisionModel.LinearName(x.Layer, x.Part))]),
            ["shapes"] = new JsonObject(LlamaTensorNames.BlockLinears.Select(part =>
                KeyValuePair.Create(part, (JsonNode?)new JsonArray([.. LlamaTensorNames.ShapeOf(c, part).Select(d => (JsonNode)d)])))),
            ["qk_permutation"] = c.RopeLayout == RopeLayout.Interleaved ? QkPermutation : "none",
            ["bitplane_layout"] = BitplaneLayout,
            ["centroid_layout"] = "F16 [rows, 2^b] per b in seed..n, named <layer>.centroids.<b>",
        };

        try
        {
            AtomicFile.WriteDirectory(outputDirectory, overwrite, dir =>
            {
                SafetensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "anyprecision" });
                AtomicFile.WriteText(Path.Combine(dir, "config.json"), config.ToJsonString(new() { WriteIndented = true }));
                if (source.TokenizerPath is not null) Llama2cTokenizerFile.CopyAsSentencePieceModel(source.TokenizerPath, Path.Combine(dir, "tokenizer.model"));
                // The chat template travels with the tokenizer (AnyPrecML.AI reads it from here).
                string chatConfig = Path.Combine(source.SourcePath, "tokenizer_config.json");
                if (Directory.Exists(source.SourcePath) && File.Exists(chatConfig)) File.Copy(chatConfig, Path.Combine(dir, "tokenizer_config.json"));
            });
        }
        finally
        {
            // A write that failed leaves no quantization running behind it (nor its exception unobserved).
            stop.Cancel();
            if (next is { } pending) try { pending.Work.Wait(CancellationToken.None); } catch (AggregateException) { }
        }
    }

    /// <summary>config.json's description of the planes (docs/FORMAT.md).</summary>
    private const string BitplaneLayout = "plane p = bit (n-1-p) of the parent code; U32 [n, R, ceil(cols/32)], element j at word j/32, bit j%32; a plane holds the linear rows, then zero rows up to R";

    /// <summary>
    /// Writes the any-precision model in <paramref name="modelDirectory"/> to <paramref name="outputDirectory"/> in this
    /// format (<see cref="FormatVersion"/>): the same weights, tensors and tensor order, each plane padded with the zero
    /// rows <see cref="BitplaneMatrix.PaddedPlaneRows"/> gives (a model written before format 3 has none, and streams its
    /// planes slower on CPUs whose L2 its plane spacing defeats), config.json's version and layout brought up to date,
    /// and every other file beside them copied. Nothing is quantized again: a model from any earlier format gets the
    /// file a fresh quantization with the same settings would have written. Written whole or not at all
    /// (<see cref="AtomicFile.WriteDirectory"/>).
    /// </summary>
    /// <returns>The format version the model was written in.</returns>
    public static int Repack(string modelDirectory, string outputDirectory, bool overwrite = false)
    {
        string source = Path.GetFullPath(modelDirectory), target = Path.GetFullPath(outputDirectory);
        if (string.Equals(source.TrimEnd(Path.DirectorySeparatorChar), target.TrimEnd(Path.DirectorySeparatorChar), StringComparison.Ordinal))
            throw new ArgumentException("the output directory must differ from the model's: the model is read while the output is written.", nameof(outputDirectory));
        using var model = AnyPrecisionModel.Open(source);
        var (file, stored, metadata) = SafetensorsReader.Open(Path.Combine(source, "model.safetensors"));
        using (file)
        {
            const string suffix = ".bitplanes";
            var tensors = stored.Select(t =>
            {
                if (!t.Name.EndsWith(suffix, StringComparison.Ordinal)) return new TensorToWrite(t.Name, t.DType, [.. t.Shape], s => s.Write(t.Bytes));
                var m = model.Linear(t.Name[..^suffix.Length]);
                return PlanesTensor(t.Name, m.ParentBits, m.Rows, m.Cols, () => m);
            }).ToList();
            var config = ModelJson.Parse(Path.Combine(source, "config.json")) as JsonObject
                ?? throw new ModelFormatException($"{Path.Combine(source, "config.json")}: not a JSON object.");
            var section = (JsonObject)config["anyprecision"]!;
            section["format_version"] = FormatVersion;
            section["bitplane_layout"] = BitplaneLayout;
            AtomicFile.WriteDirectory(target, overwrite, dir =>
            {
                SafetensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors, metadata);
                AtomicFile.WriteText(Path.Combine(dir, "config.json"), config.ToJsonString(new() { WriteIndented = true }));
                foreach (var other in Directory.EnumerateFiles(source))
                    if (Path.GetFileName(other) is not ("model.safetensors" or "config.json")) File.Copy(other, Path.Combine(dir, Path.GetFileName(other)));
            });
        }
        return model.FormatVersion;
    }

    /// <summary>
    /// A linear's planes tensor as this format stores it, [n, R, W]: each plane's rows, then its zero padding rows up to
    /// R = <see cref="BitplaneMatrix.PaddedPlaneRows"/>, whatever padding the matrix itself holds (the quantizer's and
    /// <see cref="Repack"/>'s one writer, so the shape declared and the bytes written cannot part). The matrix is asked
    /// for only when the tensor is written.
    /// </summary>
    private static TensorToWrite PlanesTensor(string name, int parentBits, int rows, int cols, Func<BitplaneMatrix> matrix)
    {
        int planeRows = BitplaneMatrix.PaddedPlaneRows(rows, cols), words = (cols + 31) / 32;
        return new TensorToWrite(name, DType.U32, [parentBits, planeRows, words], s =>
        {
            var m = matrix();
            // The shape is declared before the matrix exists: a matrix of another shape would write bytes that disagree with it.
            if (m.Rows != rows || m.Cols != cols || m.ParentBits != parentBits)
                throw new InvalidOperationException($"{name}: the matrix is {m.ParentBits} planes × {m.Rows}×{m.Cols}, the tensor was declared {parentBits} × {rows}×{cols}.");
            var padding = new byte[(long)(planeRows - rows) * words * 4];
            for (int p = 0; p < parentBits; p++)
            {
                s.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(m.Plane(p)));
                s.Write(padding);
            }
        });
    }

    /// <summary>What config.json records when q/k rows were permuted from llama2.c order (docs/FORMAT.md gives the formula).</summary>
    public const string QkPermutation = "interleaved_to_half_split: hf_row[h*D + i] = src_row[h*D + 2*i] and hf_row[h*D + D/2 + i] = src_row[h*D + 2*i + 1] for i < D/2, D = head_dim";

    /// <summary>
    /// The source weight of a block linear in Hugging Face row order: llama2.c q/k rows are permuted
    /// from interleaved to half-split RoPE pairing, so the quantized model is an ordinary HF layout.
    /// </summary>
    public static float[] SourceWeight(LlamaCheckpoint source, int layer, string part)
    {
        var c = source.Config;
        var w = source[LlamaTensorNames.Layer(layer, part)].ToFloatArray();
        int heads = part switch { "self_attn.q_proj" => c.Heads, "self_attn.k_proj" => c.KvHeads, _ => 0 };
        return heads > 0 && c.RopeLayout == RopeLayout.Interleaved ? HuggingFaceExport.InterleavedToHalfSplit(w, heads, c.HeadDim, c.Dim) : w;
    }

    /// <summary>Quantizes one linear layer of <paramref name="source"/> into planes and tables.</summary>
    public static BitplaneMatrix QuantizeLayer(LlamaCheckpoint source, int layer, string part, ISensitivitySource sensitivity, QuantizerOptions options, CancellationToken cancellationToken = default)
    {
        var shape = LlamaTensorNames.ShapeOf(source.Config, part);
        int rows = (int)shape[0], cols = (int)shape[1];
        var w = SourceWeight(source, layer, part);
        var s = SensitivityInHfOrder(source.Config, part, sensitivity.For(layer, part, rows, cols));
        // A NaN weight or sensitivity poisons the k-means of its row into NaN centroids: refused with its place.
        string tensor = LlamaTensorNames.Layer(layer, part);
        if (IndexOfNonFinite(w) is int bad and >= 0)
            throw new ModelFormatException($"{source.SourcePath}: tensor '{tensor}' holds a non-finite value (NaN or ±Inf) at [{bad / cols}, {bad % cols}]; it cannot be quantized.");
        for (int r = 0; r < (s.PerColumn ? 1 : rows); r++)
            if (IndexOfNonFinite(s.Row(r)) is int sb and >= 0)
                throw new InvalidDataException($"the {sensitivity.Kind} sensitivity of '{tensor}' is non-finite at [{r}, {sb}] (an overflowing calibration); it cannot weight the k-means.");
        ulong layerSeed = SplitMix64.Derive(options.RandomSeed, (ulong)(layer * LlamaTensorNames.BlockLinears.Length + Array.IndexOf(LlamaTensorNames.BlockLinears, part)));
        var results = new RowQuantization[rows];
        Parallel.For(0, rows, new ParallelOptions { MaxDegreeOfParallelism = options.MaxDegreeOfParallelism > 0 ? options.MaxDegreeOfParallelism : -1, CancellationToken = cancellationToken }, r =>
            results[r] = RowQuantizer.Quantize(w.AsSpan(r * cols, cols), s.Row(r), options.SeedBits, options.ParentBits, SplitMix64.Derive(layerSeed, (ulong)r), options.SeedMethod));
        return BitplaneMatrix.FromRows(AnyPrecisionModel.LinearName(layer, part), results, cols, options.MaxDegreeOfParallelism);
    }

    private static int IndexOfNonFinite(ReadOnlySpan<float> values)
    {
        for (int i = 0; i < values.Length; i++)
            if (!float.IsFinite(values[i])) return i;
        return -1;
    }

    /// <summary>Per-weight sensitivities follow the q/k row permutation; per-column ones need nothing.</summary>
    public static LayerSensitivity SensitivityInHfOrder(LlamaConfig c, string part, LayerSensitivity s)
    {
        int heads = part switch { "self_attn.q_proj" => c.Heads, "self_attn.k_proj" => c.KvHeads, _ => 0 };
        if (s.PerColumn || heads == 0 || c.RopeLayout != RopeLayout.Interleaved) return s;
        var all = new float[(long)s.Rows * s.Cols];
        for (int r = 0; r < s.Rows; r++) s.Row(r).CopyTo(all.AsSpan(r * s.Cols, s.Cols));
        return LayerSensitivity.Weights(HuggingFaceExport.InterleavedToHalfSplit(all, heads, c.HeadDim, s.Cols), s.Rows, s.Cols);
    }
}
