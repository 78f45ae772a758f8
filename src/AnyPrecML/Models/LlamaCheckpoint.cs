using System.Buffers.Binary;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace AnyPrecML.Models;

/// <summary>Where a checkpoint came from.</summary>
public enum CheckpointFormat
{
    /// <summary>A llama2.c .bin file (legacy version 0 or version 1 header, fp32).</summary>
    Llama2c,
    /// <summary>A Hugging Face directory: config.json and safetensors (single or sharded).</summary>
    HuggingFace,
}

/// <summary>Tensor names of the Llama architecture, in Hugging Face spelling, which every loader maps to.</summary>
public static class LlamaTensorNames
{
    /// <summary>Token embedding [vocab, dim].</summary>
    public const string Embedding = "model.embed_tokens.weight";
    /// <summary>Final RMSNorm weight [dim].</summary>
    public const string FinalNorm = "model.norm.weight";
    /// <summary>Output head [vocab, dim]; absent when tied to the embedding.</summary>
    public const string Head = "lm_head.weight";

    /// <summary>The seven linear layers of a decoder block, in the order of the forward pass.</summary>
    public static readonly string[] BlockLinears =
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

    /// <summary>model.layers.{layer}.{part}.weight</summary>
    public static string Layer(int layer, string part) => $"model.layers.{layer}.{part}.weight";

    /// <summary>[rows, cols] of each block tensor for <paramref name="c"/>.</summary>
    public static long[] ShapeOf(LlamaConfig c, string part) => part switch
    {
        "input_layernorm" or "post_attention_layernorm" => [c.Dim],
        "self_attn.q_proj" => [c.QDim, c.Dim],
        "self_attn.k_proj" or "self_attn.v_proj" => [c.KvDim, c.Dim],
        "self_attn.o_proj" => [c.Dim, c.QDim],
        "mlp.gate_proj" or "mlp.up_proj" => [c.HiddenDim, c.Dim],
        "mlp.down_proj" => [c.Dim, c.HiddenDim],
        _ => throw new ArgumentException($"unknown block tensor '{part}'", nameof(part)),
    };
}

/// <summary>
/// An opened Llama-architecture checkpoint: its configuration and its tensors, memory-mapped and
/// named in Hugging Face spelling whatever the file format. Open with <see cref="Open"/>; dispose to unmap.
/// </summary>
public sealed class LlamaCheckpoint : IDisposable
{
    private readonly List<MappedFile> _files;
    private readonly Dictionary<string, TensorView> _tensors;

    private LlamaCheckpoint(string path, CheckpointFormat format, LlamaConfig config, List<MappedFile> files, IEnumerable<TensorView> tensors, string? tokenizerPath)
    {
        SourcePath = path; Format = format; Config = config; _files = files; TokenizerPath = tokenizerPath;
        _tensors = new Dictionary<string, TensorView>(StringComparer.Ordinal);
        foreach (var t in tensors)
            if (!_tensors.TryAdd(t.Name, t)) throw new ModelFormatException($"{t.FilePath}: tensor '{t.Name}' appears twice.");
    }

    /// <summary>The file or directory opened.</summary>
    public string SourcePath { get; }
    /// <summary>The format it was in.</summary>
    public CheckpointFormat Format { get; }
    /// <summary>The model's configuration.</summary>
    public LlamaConfig Config { get; }
    /// <summary>The tokenizer found beside the model (tokenizer.model; beside a llama2.c file also tok{vocab}.model, tokenizer.bin, tok{vocab}.bin), or null.</summary>
    public string? TokenizerPath { get; }
    /// <summary>All tensor names.</summary>
    public IReadOnlyCollection<string> TensorNames => _tensors.Keys;

    /// <summary>The tensor called <paramref name="name"/>; throws <see cref="ModelFormatException"/> when missing.</summary>
    public TensorView this[string name] => _tensors.TryGetValue(name, out var t) ? t
        : throw new ModelFormatException($"{SourcePath}: tensor '{name}' is missing.");

    /// <summary>True when the checkpoint holds <paramref name="name"/>.</summary>
    public bool Contains(string name) => _tensors.ContainsKey(name);

    /// <summary>The output head: lm_head, or the embedding when tied.</summary>
    public TensorView HeadTensor => Config.TiedEmbeddings ? this[LlamaTensorNames.Embedding] : this[LlamaTensorNames.Head];

    /// <summary>
    /// Opens a llama2.c .bin file or a Hugging Face directory (config.json + model.safetensors or
    /// model.safetensors.index.json). Throws <see cref="ModelFormatException"/> naming the problem for
    /// truncated, inconsistent or unsupported input, and <see cref="FileNotFoundException"/> when nothing is there.
    /// </summary>
    public static LlamaCheckpoint Open(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (Directory.Exists(path))
        {
            if (IsAnyPrecision(path))
                throw new ModelFormatException($"{path}: this is an any-precision model (config.json has an 'anyprecision' section); open it with AnyPrecisionModel.Open.");
            return OpenHuggingFace(path, blockLinears: true);
        }
        if (File.Exists(path)) return OpenLlama2c(path);
        throw new FileNotFoundException($"No model at '{path}': expected a llama2.c .bin file or a Hugging Face model directory.", path);
    }

    /// <summary>True when <paramref name="directory"/>'s config.json has an "anyprecision" section.</summary>
    public static bool IsAnyPrecision(string directory)
    {
        string cfg = Path.Combine(directory, "config.json");
        if (!File.Exists(cfg)) return false;
        try { return ModelJson.Parse(cfg) is JsonObject o && o["anyprecision"] is JsonObject; }
        catch (ModelFormatException) { return false; }
    }

    private LlamaCheckpoint Validated(bool blockLinears = true)
    {
        var c = Config;
        this[LlamaTensorNames.Embedding].Expect(c.VocabSize, c.Dim);
        this[LlamaTensorNames.FinalNorm].Expect(c.Dim);
        HeadTensor.Expect(c.VocabSize, c.Dim);
        var parts = new[] { "input_layernorm", "post_attention_layernorm" }.Concat(blockLinears ? LlamaTensorNames.BlockLinears : []);
        for (int l = 0; l < c.Layers; l++)
            foreach (var part in parts)
                this[LlamaTensorNames.Layer(l, part)].Expect(LlamaTensorNames.ShapeOf(c, part));
        // NaN or ±Inf weights make every output NaN (empty generations, NaN perplexity): refused here, once, by name. The
        // scan reads every float tensor (half a GB of tables and embedding at the 1.1B shape), so tensors go in parallel;
        // the error names the first bad one in the file's order, as a scan one by one would.
        var tensors = _tensors.Values.ToArray();
        var nonFinite = new long[tensors.Length];
        Parallel.For(0, tensors.Length, i => nonFinite[i] = tensors[i].IndexOfNonFinite());
        int bad = Array.FindIndex(nonFinite, i => i >= 0);
        if (bad >= 0) tensors[bad].ExpectFinite();
        return this;
    }

    // ---------------------------------------------------------------- llama2.c

    private const uint Llama2cMagic = 0x616b3432; // "ak42"

    private static LlamaCheckpoint OpenLlama2c(string path)
    {
        var file = new MappedFile(path);
        try
        {
            if (file.Length < 28) throw new ModelFormatException($"{path}: truncated llama2.c checkpoint ({file.Length} bytes; the header alone takes 28).");
            ReadOnlySpan<byte> head = file.ReadBytes(0, (int)Math.Min(file.Length, 256), "header");
            int version;
            long dataStart;
            int[] h = new int[7];
            bool shared;
            if (BinaryPrimitives.ReadUInt32LittleEndian(head) == Llama2cMagic)
            {
                if (file.Length < 256) throw new ModelFormatException($"{path}: truncated llama2.c version-1 header ({file.Length} of 256 bytes).");
                version = BinaryPrimitives.ReadInt32LittleEndian(head[4..]);
                if (version != 1)
                    throw new ModelFormatException($"{path}: llama2.c checkpoint version {version} is not supported (only the fp32 versions 0 and 1 are).");
                for (int i = 0; i < 7; i++) h[i] = BinaryPrimitives.ReadInt32LittleEndian(head[(8 + 4 * i)..]);
                shared = head[36] != 0;
                dataStart = 256;
            }
            else
            {
                version = 0;
                for (int i = 0; i < 7; i++) h[i] = BinaryPrimitives.ReadInt32LittleEndian(head[(4 * i)..]);
                // Version 0 marks a separate classifier with a negative vocabulary size; -2^31 has no
                // positive twin in an int, so it is clamped (and then refused by the range check).
                shared = h[5] > 0;
                h[5] = h[5] == int.MinValue ? int.MaxValue : Math.Abs(h[5]);
                dataStart = 28;
            }
            var config = new LlamaConfig
            {
                Dim = h[0], HiddenDim = h[1], Layers = h[2], Heads = h[3], KvHeads = h[4], VocabSize = h[5], MaxSeqLen = h[6],
                HeadDim = h[3] > 0 ? h[0] / h[3] : 0,
                RmsNormEps = 1e-5f, RopeTheta = 10000f, RopeLayout = RopeLayout.Interleaved, TiedEmbeddings = shared,
                BosTokenId = 1, EosTokenId = 2,
            }.Validated(path);
            if (config.Dim % config.Heads != 0) throw new ModelFormatException($"{path}: dim {config.Dim} is not a multiple of n_heads {config.Heads}.");

            var tensors = new List<TensorView>();
            long offset = dataStart;
            void Add(string name, params long[] shape)
            {
                var t = new TensorView(name, DType.F32, shape, file, offset);
                offset = checked(offset + t.ByteLength);
            }
            // The order is llama2.c's export order; each per-layer array is L consecutive tensors.
            void AddLayers(string part)
            {
                for (int l = 0; l < config.Layers; l++)
                {
                    var t = new TensorView(LlamaTensorNames.Layer(l, part), DType.F32, LlamaTensorNames.ShapeOf(config, part), file, offset);
                    tensors.Add(t);
                    offset = checked(offset + t.ByteLength);
                }
            }
            void AddOne(string name, params long[] shape)
            {
                var t = new TensorView(name, DType.F32, shape, file, offset);
                tensors.Add(t);
                offset = checked(offset + t.ByteLength);
            }
            try
            {
                if (version == 0)
                {
                    AddOne(LlamaTensorNames.Embedding, config.VocabSize, config.Dim);
                    AddLayers("input_layernorm");
                    AddLayers("self_attn.q_proj"); AddLayers("self_attn.k_proj"); AddLayers("self_attn.v_proj"); AddLayers("self_attn.o_proj");
                    AddLayers("post_attention_layernorm");
                    AddLayers("mlp.gate_proj"); AddLayers("mlp.down_proj"); AddLayers("mlp.up_proj");
                    AddOne(LlamaTensorNames.FinalNorm, config.Dim);
                    Add("freq_cis_real", config.MaxSeqLen, config.HeadDim / 2); // unused: RoPE is computed
                    Add("freq_cis_imag", config.MaxSeqLen, config.HeadDim / 2);
                }
                else
                {
                    AddLayers("input_layernorm"); AddLayers("post_attention_layernorm");
                    AddOne(LlamaTensorNames.FinalNorm, config.Dim);
                    AddOne(LlamaTensorNames.Embedding, config.VocabSize, config.Dim);
                    AddLayers("self_attn.q_proj"); AddLayers("self_attn.k_proj"); AddLayers("self_attn.v_proj"); AddLayers("self_attn.o_proj");
                    AddLayers("mlp.gate_proj"); AddLayers("mlp.down_proj"); AddLayers("mlp.up_proj");
                }
                if (!shared) AddOne(LlamaTensorNames.Head, config.VocabSize, config.Dim);
            }
            catch (OverflowException)
            {
                throw new ModelFormatException($"{path}: the header's sizes overflow.");
            }
            if (offset > file.Length)
                throw new ModelFormatException($"{path}: truncated llama2.c checkpoint: the header implies {offset} bytes, the file has {file.Length}.");
            if (offset < file.Length)
                throw new ModelFormatException($"{path}: the llama2.c header implies {offset} bytes but the file has {file.Length}; the header does not describe this file.");

            string dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
            // A SentencePiece model first, then llama2.c's own tokenizer.bin (Llama2cTokenizerFile rebuilds the model from it).
            string? tok = new[] { "tokenizer.model", $"tok{config.VocabSize}.model", "tokenizer.bin", $"tok{config.VocabSize}.bin" }
                .Select(name => Path.Combine(dir, name)).FirstOrDefault(File.Exists);
            return new LlamaCheckpoint(path, CheckpointFormat.Llama2c, config, [file], tensors, tok).Validated();
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    // ---------------------------------------------------------------- Hugging Face

    private static readonly string[] SupportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM"];

    /// <summary>Reads a Hugging Face config.json into a <see cref="LlamaConfig"/>.</summary>
    public static LlamaConfig ReadHuggingFaceConfig(string configPath)
    {
        if (!File.Exists(configPath)) throw new ModelFormatException($"{configPath}: config.json is missing.");
        if (ModelJson.Parse(configPath) is not JsonObject o) throw new ModelFormatException($"{configPath}: not a JSON object.");

        // Every field is read through TryGetValue: a value of the wrong JSON kind is a format error naming the key,
        // never a .NET conversion exception.
        string? Text(JsonNode? n) => n is JsonValue v && v.TryGetValue<string>(out var t) ? t : null;
        if (o["architectures"] is not (null or JsonArray)) throw new ModelFormatException($"{configPath}: 'architectures' must be a list of names.");
        var archs = (o["architectures"] as JsonArray)?.Select(a => Text(a) ?? "").ToArray() ?? [];
        string modelType = Text(o["model_type"]) ?? "";
        bool known = archs.Length > 0 ? archs.Any(SupportedArchitectures.Contains) : modelType is "llama" or "mistral";
        if (!known)
            throw new ModelFormatException($"{configPath}: architecture '{(archs.Length > 0 ? string.Join(", ", archs) : modelType)}' is not supported; supported: {string.Join(", ", SupportedArchitectures)}.");
        if (o["rope_scaling"] is JsonObject)
            throw new ModelFormatException($"{configPath}: rope_scaling is not supported yet (plain RoPE only).");

        int Int(string key, int? fallback = null)
        {
            var n = o[key];
            if (n is null) return fallback ?? throw new ModelFormatException($"{configPath}: '{key}' is missing.");
            return n is JsonValue v && v.TryGetValue<int>(out int i) ? i : throw new ModelFormatException($"{configPath}: '{key}' is not a 32-bit integer.");
        }
        float Float(string key, float fallback)
        {
            var n = o[key];
            if (n is null) return fallback;
            return n is JsonValue v && v.TryGetValue<double>(out double d) ? (float)d : throw new ModelFormatException($"{configPath}: '{key}' is not a number.");
        }
        bool Bool(string key, bool fallback)
        {
            var n = o[key];
            if (n is null) return fallback;
            return n is JsonValue v && v.TryGetValue<bool>(out bool b) ? b : throw new ModelFormatException($"{configPath}: '{key}' is not true or false.");
        }
        // Token ids come as a number, a list of numbers (the first is used) or null; [] and [null] mean "not given".
        int IdOf(string key, int fallback)
        {
            var n = o[key] is JsonArray a ? (a.Count > 0 ? a[0] : null) : o[key];
            if (n is null) return fallback;
            return n is JsonValue v && v.TryGetValue<int>(out int id) ? id
                : throw new ModelFormatException($"{configPath}: '{key}' is not a token id (an integer or a list of integers).");
        }
        int dim = Int("hidden_size"), heads = Int("num_attention_heads");
        return new LlamaConfig
        {
            Dim = dim,
            HiddenDim = Int("intermediate_size"),
            Layers = Int("num_hidden_layers"),
            Heads = heads,
            KvHeads = Int("num_key_value_heads", heads),
            VocabSize = Int("vocab_size"),
            MaxSeqLen = Int("max_position_embeddings", 2048),
            HeadDim = o["head_dim"] is null ? (heads > 0 ? dim / heads : 0) : Int("head_dim"),
            RmsNormEps = Float("rms_norm_eps", 1e-6f),
            RopeTheta = Float("rope_theta", 10000f),
            RopeLayout = RopeLayout.HalfSplit,
            TiedEmbeddings = Bool("tie_word_embeddings", false),
            BosTokenId = IdOf("bos_token_id", 1),
            EosTokenId = IdOf("eos_token_id", 2),
        }.Validated(configPath);
    }

    /// <summary>Opens a Hugging Face directory; with <paramref name="blockLinears"/> false the block linear weights need not be there (any-precision models store them as bitplanes).</summary>
    internal static LlamaCheckpoint OpenHuggingFace(string dir, bool blockLinears)
    {
        var config = ReadHuggingFaceConfig(Path.Combine(dir, "config.json"));
        var files = new List<MappedFile>();
        var tensors = new List<TensorView>();
        try
        {
            string single = Path.Combine(dir, "model.safetensors"), index = Path.Combine(dir, "model.safetensors.index.json");
            IEnumerable<string> shardNames;
            Dictionary<string, string>? weightMap = null;
            if (File.Exists(single)) shardNames = ["model.safetensors"];
            else if (File.Exists(index))
            {
                weightMap = ReadIndex(index);
                shardNames = weightMap.Values.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList();
            }
            else throw new ModelFormatException($"{dir}: neither model.safetensors nor model.safetensors.index.json is there.");

            foreach (var shard in shardNames)
            {
                if (shard.Contains('/') || shard.Contains('\\') || shard.Contains(".."))
                    throw new ModelFormatException($"{index}: shard name '{shard}' must be a file in the model directory.");
                string shardPath = Path.Combine(dir, shard);
                if (!File.Exists(shardPath)) throw new ModelFormatException($"{dir}: shard '{shard}' named by the index is missing.");
                var (file, views, _) = SafetensorsReader.Open(shardPath);
                files.Add(file);
                foreach (var v in views)
                {
                    if (weightMap is not null && weightMap.TryGetValue(v.Name, out var owner) && owner != shard)
                        throw new ModelFormatException($"{shardPath}: tensor '{v.Name}' is in this shard but the index places it in '{owner}'.");
                    tensors.Add(v);
                }
            }
            if (weightMap is not null)
                foreach (var (name, shard) in weightMap)
                    if (!tensors.Any(t => t.Name == name)) throw new ModelFormatException($"{dir}: the index places '{name}' in '{shard}', which does not hold it.");

            // Checkpoints that tie the head often omit lm_head; ones that do not tie must have it.
            if (!config.TiedEmbeddings && !tensors.Any(t => t.Name == LlamaTensorNames.Head))
                throw new ModelFormatException($"{dir}: lm_head.weight is missing and tie_word_embeddings is false.");
            string tok = Path.Combine(dir, "tokenizer.model");
            return new LlamaCheckpoint(dir, CheckpointFormat.HuggingFace, config, files, tensors, File.Exists(tok) ? tok : null).Validated(blockLinears);
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
    }

    private static Dictionary<string, string> ReadIndex(string indexPath)
    {
        var root = ModelJson.Parse(indexPath, "not a valid safetensors index") as JsonObject;
        var map = root?["weight_map"] as JsonObject ?? throw new ModelFormatException($"{indexPath}: 'weight_map' is missing.");
        return map.ToDictionary(kv => kv.Key, kv => kv.Value is JsonValue v && v.TryGetValue<string>(out var shard) ? shard
            : throw new ModelFormatException($"{indexPath}: the shard of '{kv.Key}' is not a file name."), StringComparer.Ordinal);
    }

    /// <summary>Unmaps the files.</summary>
    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
        _files.Clear();
    }
}
