using System.Globalization;
using System.Runtime.CompilerServices;
using System.Threading.Channels;
using AnyPrecML.Generation;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;
using Microsoft.Extensions.AI;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.AI;

/// <summary>Settings of an <see cref="AnyPrecisionChatClient"/>.</summary>
public sealed class AnyPrecisionChatClientOptions
{
    /// <summary>The model's name in model ids (<c>name</c>, <c>name@3bit</c>); default: the model directory's name.</summary>
    public string? ModelName { get; set; }
    /// <summary>Width used when a request names none; default: the parent width.</summary>
    public int? DefaultBits { get; set; }
    /// <summary>Chat template by name (plain, llama2, llama3, chatml, zephyr); default: detected from tokenizer_config.json.</summary>
    public string? ChatTemplate { get; set; }
    /// <summary>Most tokens generated when a request sets no <see cref="ChatOptions.MaxOutputTokens"/>.</summary>
    public int DefaultMaxOutputTokens { get; set; } = 256;
    /// <summary>Bitplane kernels of the engine (default: the library's default backend).</summary>
    public BitplaneBackend? Backend { get; set; }
    /// <summary>What the engine's key/value caches hold (default: the engine's, bf16 on the CPU; see <see cref="OnnxEngineOptions.KvCacheType"/>).</summary>
    public KvCacheType? KvCacheType { get; set; }
    /// <summary>
    /// Most concurrent requests whose decode steps run as one pass (<see cref="BatchingEngine"/>; default 16, 1 turns
    /// batching off). Requests at one width then share each linear's reads of the planes; with the CPU engine's int8
    /// kernels each still gets exactly the tokens it would get alone (fp32 kernels sum several tokens in another order).
    /// </summary>
    public int MaxBatch { get; set; } = 16;
    /// <summary>
    /// Finished requests' key/value caches kept per width for the next prompts (<see cref="PromptCache"/>; default 4, 0
    /// keeps none): a chat's next turn, or a prompt with a shared start, then prefills only its new tokens.
    /// </summary>
    public int PromptCacheEntries { get; set; } = 4;
}

/// <summary>A request named a model or width the client does not serve (OpenAI's <c>model_not_found</c>).</summary>
public sealed class UnknownModelException(string message) : ArgumentException(message);

/// <summary>What <see cref="AnyPrecisionChatClient.GetService"/> returns besides <see cref="ChatClientMetadata"/>: the model and how it is served.</summary>
/// <param name="ModelName">The name model ids start with.</param>
/// <param name="Template">The chat template in use and whether it was detected or chosen.</param>
/// <param name="TemplateSource">"tokenizer_config.json" when detected from the model, "options" when chosen, "none" for a model without a template.</param>
/// <param name="DefaultBits">Width of requests that name none.</param>
/// <param name="SupportedBits">Every width the parent holds.</param>
/// <param name="ContextLength">The model's context in tokens.</param>
public sealed record AnyPrecisionChatClientMetadata(string ModelName, ChatTemplate Template, string TemplateSource, int DefaultBits, IReadOnlyList<int> SupportedBits, int ContextLength)
{
    /// <summary>Every model id the client answers to: the bare name (default width), then <c>name@{b}bit</c> per width.</summary>
    public IReadOnlyList<string> ModelIds => [ModelName, .. SupportedBits.Select(b => AnyPrecisionChatClient.ModelId(ModelName, b))];
}

/// <summary>
/// <see cref="IChatClient"/> over one any-precision parent: one <see cref="OnnxEngine"/> and one copy of the
/// weights serve every width, chosen per request by <see cref="ChatOptions.ModelId"/> (<c>stories260K@3bit</c>)
/// or <c>AdditionalProperties["bits"]</c>. Requests may run concurrently, at the same or different widths; the decode
/// steps of those at one width run as shared passes (<see cref="Batching"/>), and each width keeps its last requests'
/// key/value caches for prompts that start the same way (<see cref="PromptCacheOf"/>: a chat's next turn prefills only
/// its new tokens). Generation runs on its own thread, at most a few tokens ahead of the reader, and stops between tokens
/// when the token is cancelled or the reader stops reading.
/// </summary>
public sealed class AnyPrecisionChatClient : IChatClient
{
    /// <summary>Key of <see cref="ChatOptions.AdditionalProperties"/> that sets the width.</summary>
    public const string BitsProperty = "bits";

    /// <summary>
    /// Key of <see cref="ChatOptions.AdditionalProperties"/> that turns on self-speculative decoding with this draft width
    /// (below the width served), or with <see cref="AutoDraft"/> the draft this machine measured fastest for that width
    /// (<see cref="PrecisionRouter.FastestFor"/>; none when no draft beats the width alone).
    /// </summary>
    public const string DraftBitsProperty = "draft_bits";

    /// <summary>The <see cref="DraftBitsProperty"/> value that lets the router choose the draft.</summary>
    public const string AutoDraft = "auto";

    /// <summary>Key of <see cref="ChatOptions.AdditionalProperties"/> for the tokens drafted per round (default 4).</summary>
    public const string DraftTokensProperty = "draft_tokens";

    /// <summary>
    /// Key of <see cref="ChatOptions.AdditionalProperties"/> with a per-token latency budget in milliseconds: the request runs at
    /// the widest width, or draft/target pair, whose cost measured on this machine meets it (<see cref="PrecisionRouter"/>;
    /// costs cached beside the model). Replaces the width in the model id, <see cref="BitsProperty"/> and <see cref="DraftBitsProperty"/>.
    /// </summary>
    public const string LatencyBudgetProperty = "latency_budget_ms";

    /// <summary>Key of <see cref="ChatOptions.AdditionalProperties"/>: "error" (default) refuses a budget no width meets; "fastest" runs the fastest route with a warning in the route.</summary>
    public const string OverBudgetProperty = "over_budget";

    /// <summary>Key of the response's <see cref="ChatResponse.AdditionalProperties"/> (and the last streamed update's) with the router's decision, a <see cref="RouteDecision"/>, when the request had a budget.</summary>
    public const string RouteProperty = "route";

    private readonly AnyPrecisionModel _model;
    private readonly OnnxEngine _engine;
    private readonly BatchingEngine _batcher;
    private readonly Tokenizer _tokenizer;
    private readonly bool _owns;
    private readonly int _defaultMaxTokens;
    private readonly ChatClientMetadata _metadata;
    private readonly Dictionary<int, TextGenerator> _generators;
    private readonly Lazy<PrecisionCosts> _costs;
    private int _disposed;

    /// <summary>Opens the any-precision model in <paramref name="modelDirectory"/> and serves it; disposing the client closes it.</summary>
    public AnyPrecisionChatClient(string modelDirectory, AnyPrecisionChatClientOptions? options = null)
        : this(AnyPrecisionModel.Open(modelDirectory), options, owns: true, modelDirectory)
    {
    }

    /// <summary>Serves <paramref name="model"/> (left open on dispose: it is the caller's).</summary>
    public AnyPrecisionChatClient(AnyPrecisionModel model, AnyPrecisionChatClientOptions? options = null)
        : this(model, options, owns: false, model.Checkpoint.SourcePath)
    {
    }

    private AnyPrecisionChatClient(AnyPrecisionModel model, AnyPrecisionChatClientOptions? options, bool owns, string directory)
    {
        options ??= new AnyPrecisionChatClientOptions();
        _model = model;
        _owns = owns;
        try
        {
            ArgumentOutOfRangeException.ThrowIfNegative(options.DefaultMaxOutputTokens);
            ArgumentOutOfRangeException.ThrowIfLessThan(options.MaxBatch, 1);
            ArgumentOutOfRangeException.ThrowIfNegative(options.PromptCacheEntries);
            _defaultMaxTokens = options.DefaultMaxOutputTokens;
            _tokenizer = LlamaTokenizerLoader.Load(model.Checkpoint);
            int defaultBits = model.CheckBits(options.DefaultBits ?? model.ParentBits);
            string fullDirectory = Path.GetFullPath(directory);
            string name = options.ModelName ?? Path.GetFileName(fullDirectory.TrimEnd(Path.DirectorySeparatorChar));
            if (name.Length == 0 || name.Contains('@')) throw new ArgumentException($"model name '{name}' must be non-empty and without '@'.");
            var (template, source) = options.ChatTemplate is { } chosen ? (ChatTemplate.Named(chosen), "options")
                : ChatTemplate.FromModelDirectory(fullDirectory) is var detected && detected != ChatTemplate.Plain ? (detected, "tokenizer_config.json")
                : (ChatTemplate.Plain, "none");
            Metadata = new AnyPrecisionChatClientMetadata(name, template, source, defaultBits, model.SupportedBits, model.Config.MaxSeqLen);
            _metadata = new ChatClientMetadata("AnyPrecML", new Uri(fullDirectory), ModelId(name, defaultBits));
            _engine = new OnnxEngine(model, new OnnxEngineOptions { Bits = defaultBits, Backend = options.Backend, KvCacheType = options.KvCacheType });
            _batcher = new BatchingEngine(_engine, options.MaxBatch);
            _generators = model.SupportedBits.ToDictionary(b => b, b => new TextGenerator(new WidthEngine(_batcher, b), _tokenizer)
            {
                PromptCache = options.PromptCacheEntries > 0 ? new PromptCache(options.PromptCacheEntries) : null,
            });
            // Measured the first time a request has a budget, with the fingerprint `anyprec generate` gives the same engine.
            string accuracy = options.Backend is CpuBitplaneBackend { Accuracy: KernelAccuracy.Float32 } ? "fp32" : "int8";
            _costs = new Lazy<PrecisionCosts>(() => PrecisionRouter.Load(_engine, fullDirectory, $"{nameof(OnnxEngine)} {accuracy}", out _));
        }
        catch
        {
            if (owns) model.Dispose();
            throw;
        }
    }

    /// <summary>The engine serving every width.</summary>
    public OnnxEngine Engine => _engine;

    /// <summary>What gathers concurrent requests' decode steps into shared passes, with its counts (passes, steps, largest).</summary>
    public BatchingEngine Batching => _batcher;

    /// <summary>The key/value caches kept for requests at <paramref name="bits"/>, with their counts; null when none are kept.</summary>
    public PromptCache? PromptCacheOf(int bits) => _generators.TryGetValue(bits, out var generator) ? generator.PromptCache : throw new UnknownModelException($"the model serves {string.Join(", ", _generators.Keys)} bits, not {bits}.");

    /// <summary>The model's name, template, widths and context.</summary>
    public AnyPrecisionChatClientMetadata Metadata { get; }

    /// <summary>The model id of width <paramref name="bits"/>: <c>name@{bits}bit</c>.</summary>
    public static string ModelId(string name, int bits) => $"{name}@{bits}bit";

    /// <inheritdoc/>
    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var request = Prepare(Metadata.Template.Format(messages), options, chat: true);
        var text = new System.Text.StringBuilder();
        CompletionStep last = default;
        await foreach (var step in RunAsync(request, cancellationToken).ConfigureAwait(false))
        {
            text.Append(step.Text);
            last = step;
        }
        return new ChatResponse(new ChatMessage(ChatRole.Assistant, text.ToString()))
        {
            ModelId = request.ModelId,
            FinishReason = last.FinishReason,
            Usage = Usage(request, last),
            CreatedAt = DateTimeOffset.UtcNow,
            AdditionalProperties = request.Route is { } route ? new() { [RouteProperty] = route } : null,
        };
    }

    /// <inheritdoc/>
    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var request = Prepare(Metadata.Template.Format(messages), options, chat: true);
        string responseId = "chatcmpl-" + Guid.NewGuid().ToString("N");
        await foreach (var step in RunAsync(request, cancellationToken).ConfigureAwait(false))
        {
            var update = new ChatResponseUpdate(ChatRole.Assistant, step.Text) { ModelId = request.ModelId, ResponseId = responseId, MessageId = responseId };
            if (step.FinishReason is { } finish)
            {
                update.FinishReason = finish;
                update.Contents.Add(new UsageContent(Usage(request, step)));
                if (request.Route is { } route) update.AdditionalProperties = new() { [RouteProperty] = route };
            }
            yield return update;
        }
    }

    /// <inheritdoc/>
    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null) return null;
        if (serviceType == typeof(ChatClientMetadata)) return _metadata;
        if (serviceType == typeof(AnyPrecisionChatClientMetadata)) return Metadata;
        if (serviceType.IsInstanceOfType(_engine)) return _engine;
        if (serviceType.IsInstanceOfType(_model)) return _model;
        return serviceType.IsInstanceOfType(this) ? this : null;
    }

    /// <summary>Closes the engine, and the model when the client opened it.</summary>
    public void Dispose()
    {
        // A DI container and a middleware pipeline may both dispose the one client.
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        _engine.Dispose();
        if (_owns) _model.Dispose();
    }

    /// <summary>A request checked and resolved: everything that can be wrong with it is found here, before any token runs.</summary>
    internal sealed record PreparedRequest(string Prompt, int Bits, string ModelId, GenerationOptions Generation, IReadOnlyList<string> Stops, int PromptTokens, RouteDecision? Route = null);

    /// <summary>One step of a run: the text it adds, and on the last step the finish reason and the tokens generated.</summary>
    internal readonly record struct CompletionStep(string Text, ChatFinishReason? FinishReason, int OutputTokens);

    /// <summary>
    /// Checks <paramref name="options"/> and the prompt against the model: the width (model id or bits property),
    /// the sampling settings, and that the prompt leaves room in the context.
    /// </summary>
    /// <exception cref="ArgumentException">Something in the request is out of range or unknown; the message names it.</exception>
    internal PreparedRequest Prepare(string prompt, ChatOptions? options, bool chat)
    {
        var properties = options?.AdditionalProperties;
        var route = Route(options?.ModelId, properties);
        int bits = route?.Route.Bits ?? ResolveBits(options?.ModelId, properties);
        int maxTokens = options?.MaxOutputTokens ?? _defaultMaxTokens;
        if (maxTokens < 0) throw new ArgumentException($"max tokens must be 0 or more, not {maxTokens}.");
        var generation = new GenerationOptions
        {
            MaxTokens = maxTokens,
            Temperature = options?.Temperature ?? 0f,
            TopP = options?.TopP ?? 1f,
            TopK = options?.TopK ?? 0,
            Seed = options?.Seed is long seed ? unchecked((ulong)seed) : null,
        };
        if (properties is not null && properties.TryGetValue(DraftBitsProperty, out object? draftValue) && IsAuto(draftValue))
            route = PrecisionRouter.FastestFor(_costs.Value, bits); // a budget with it was refused in Route
        else if (IntProperty(options?.AdditionalProperties, DraftBitsProperty) is int draft)
        {
            // The draft reads the top planes of the same parent: it must be narrower than the width served.
            if (draft < Metadata.SupportedBits[0] || draft >= bits)
                throw new ArgumentException($"'{DraftBitsProperty}' {draft} must be in {Metadata.SupportedBits[0]}..{bits - 1} (below the {bits} bits served).");
            int k = IntProperty(options?.AdditionalProperties, DraftTokensProperty) ?? 4;
            if (k < 1 || k > 16) throw new ArgumentException($"'{DraftTokensProperty}' must be in 1..16, not {k}.");
            generation = generation with { DraftBits = draft, DraftTokens = k };
        }
        if (route?.Route.DraftBits is int routedDraft) generation = generation with { DraftBits = routedDraft, DraftTokens = route.Route.DraftTokens };
        try { generation.Validated(); }
        catch (ArgumentOutOfRangeException e)
        {
            string message = e.Message.Split('\n')[0];
            int parameter = message.IndexOf(" (Parameter", StringComparison.Ordinal);
            throw new ArgumentException(parameter < 0 ? message : message[..parameter], e);
        }
        List<string> stops = [.. (options?.StopSequences ?? []).Where(s => !string.IsNullOrEmpty(s))];
        if (chat && Metadata.Template.EndOfTurn is { } end) stops.Add(end);
        int promptTokens = PromptTokens(prompt);
        if (promptTokens >= Metadata.ContextLength)
            throw new ArgumentException($"the prompt has {promptTokens} tokens; the model's context is {Metadata.ContextLength} (at least one token must be left to generate).");
        return new PreparedRequest(prompt, bits, ModelId(Metadata.ModelName, bits), generation, stops, promptTokens, route);
    }

    private static bool IsAuto(object? value) =>
        value is string s ? s == AutoDraft : value is System.Text.Json.JsonElement { ValueKind: System.Text.Json.JsonValueKind.String } j && j.GetString() == AutoDraft;

    /// <summary>The router's decision for a request with a latency budget; null without one.</summary>
    private RouteDecision? Route(string? modelId, AdditionalPropertiesDictionary? properties)
    {
        if (properties is null || !properties.TryGetValue(LatencyBudgetProperty, out object? value) || value is null) return null;
        double budget = value switch
        {
            double d => d, float f => f, int i => i, long l => l,
            System.Text.Json.JsonElement { ValueKind: System.Text.Json.JsonValueKind.Number } j => j.GetDouble(),
            string s when double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double d) => d,
            _ => throw new ArgumentException($"'{LatencyBudgetProperty}' must be a number of milliseconds, not '{value}'."),
        };
        if (modelId?.Contains('@') == true || properties.ContainsKey(BitsProperty) || properties.ContainsKey(DraftBitsProperty))
            throw new ArgumentException($"'{LatencyBudgetProperty}' chooses the width itself: drop the width from the model id and '{BitsProperty}'/'{DraftBitsProperty}'.");
        ResolveBits(modelId, null); // the name must still be this model's
        bool fastest = properties.TryGetValue(OverBudgetProperty, out object? over) && over?.ToString() switch
        {
            "fastest" => true,
            "error" or null => false,
            var other => throw new ArgumentException($"'{OverBudgetProperty}' must be \"error\" or \"fastest\", not '{other}'."),
        };
        return PrecisionRouter.Choose(_costs.Value, budget, fastest);
    }

    /// <summary>The width a request asks for: <c>name@{b}bit</c> (or <c>name@{b}</c>) in the model id, else the bits property, else the default.</summary>
    internal int ResolveBits(string? modelId, AdditionalPropertiesDictionary? properties)
    {
        int? fromId = null;
        if (!string.IsNullOrEmpty(modelId))
        {
            int at = modelId.IndexOf('@');
            string name = at < 0 ? modelId : modelId[..at];
            if (name != Metadata.ModelName) throw new UnknownModelException($"unknown model '{modelId}'; this server serves {string.Join(", ", Metadata.ModelIds)}.");
            if (at >= 0)
            {
                string width = modelId[(at + 1)..];
                width = width.EndsWith("bits", StringComparison.Ordinal) ? width[..^4] : width.EndsWith("bit", StringComparison.Ordinal) ? width[..^3] : width;
                fromId = int.TryParse(width, NumberStyles.None, CultureInfo.InvariantCulture, out int b) && Metadata.SupportedBits.Contains(b) ? b
                    : throw new UnknownModelException($"unknown width in model '{modelId}'; this parent holds {Metadata.SupportedBits[0]}..{Metadata.SupportedBits[^1]} bits.");
            }
        }
        int? fromProperty = IntProperty(properties, BitsProperty);
        if (fromProperty is not null && !Metadata.SupportedBits.Contains(fromProperty.Value))
            throw new ArgumentException($"bits {fromProperty} is outside this parent's {Metadata.SupportedBits[0]}..{Metadata.SupportedBits[^1]}.");
        if (fromId is not null && fromProperty is not null && fromId != fromProperty)
            throw new ArgumentException($"model '{modelId}' and bits {fromProperty} ask for different widths.");
        return fromId ?? fromProperty ?? Metadata.DefaultBits;
    }

    /// <summary>An integer in <paramref name="properties"/> under <paramref name="key"/> (int, long, JSON number or digits), or null when absent.</summary>
    private static int? IntProperty(AdditionalPropertiesDictionary? properties, string key)
    {
        if (properties is null || !properties.TryGetValue(key, out object? value) || value is null) return null;
        return value switch
        {
            int i => i,
            long l when l is >= int.MinValue and <= int.MaxValue => (int)l,
            System.Text.Json.JsonElement { ValueKind: System.Text.Json.JsonValueKind.Number } j when j.TryGetInt32(out int i) => i,
            string s when int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out int i) => i,
            _ => throw new ArgumentException($"'{key}' must be an integer, not '{value}'."),
        };
    }

    /// <summary>
    /// Runs a prepared request: text as it comes, with stop sequences cut out (text that might begin one is held
    /// back until it cannot), and a last step carrying the finish reason. Generation runs on its own thread, at
    /// most a few tokens ahead; it stops when <paramref name="cancellationToken"/> fires or the reader stops.
    /// </summary>
    internal async IAsyncEnumerable<CompletionStep> RunAsync(PreparedRequest request, [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var text = new System.Text.StringBuilder();
        int emitted = 0, tokens = 0;
        await foreach (var step in TokensAsync(request, cancellationToken).ConfigureAwait(false))
        {
            if (step.StopReason != "eos") tokens++;
            text.Append(step.Text);
            int stopAt = FirstStop(text, request.Stops, Math.Max(0, emitted - LongestStop(request.Stops)));
            if (stopAt >= 0)
            {
                yield return new CompletionStep(text.ToString(emitted, Math.Max(0, stopAt - emitted)), ChatFinishReason.Stop, tokens);
                yield break;
            }
            if (step.StopReason is { } reason)
            {
                yield return new CompletionStep(text.ToString(emitted, text.Length - emitted), reason == "eos" ? ChatFinishReason.Stop : ChatFinishReason.Length, tokens);
                yield break;
            }
            int safe = text.Length - HeldBack(text, request.Stops);
            if (safe > emitted)
            {
                yield return new CompletionStep(text.ToString(emitted, safe - emitted), null, tokens);
                emitted = safe;
            }
        }
        // MaxTokens 0: the generator yields nothing.
        yield return new CompletionStep("", ChatFinishReason.Length, 0);
    }

    private async IAsyncEnumerable<GeneratedToken> TokensAsync(PreparedRequest request, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        // Bounded: generation runs at most a few tokens ahead of the reader, so a reader that stops stops it.
        var channel = Channel.CreateBounded<GeneratedToken>(new BoundedChannelOptions(2) { SingleReader = true, SingleWriter = true });
        var generator = _generators[request.Bits];
        var producer = Task.Factory.StartNew(() =>
        {
            try
            {
                foreach (var step in generator.GenerateTokens(request.Prompt, request.Generation, stop.Token))
                    while (!channel.Writer.TryWrite(step))
                        if (!channel.Writer.WaitToWriteAsync(stop.Token).AsTask().GetAwaiter().GetResult()) return;
                channel.Writer.TryComplete();
            }
            catch (Exception e) { channel.Writer.TryComplete(e); }
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        try
        {
            await foreach (var step in channel.Reader.ReadAllAsync(cancellationToken).ConfigureAwait(false))
                yield return step;
        }
        finally
        {
            stop.Cancel();
            await producer.ConfigureAwait(false);
        }
    }

    private int PromptTokens(string prompt)
    {
        var ids = _tokenizer.EncodeToIds(prompt);
        return ids.Count > 0 && ids[0] == _model.Config.BosTokenId ? ids.Count : ids.Count + 1;
    }

    private static UsageDetails Usage(PreparedRequest request, CompletionStep last) => new()
    {
        InputTokenCount = request.PromptTokens,
        OutputTokenCount = last.OutputTokens,
        TotalTokenCount = request.PromptTokens + last.OutputTokens,
    };

    private static int LongestStop(IReadOnlyList<string> stops) => stops.Count == 0 ? 0 : stops.Max(s => s.Length);

    /// <summary>Index of the earliest stop sequence in <paramref name="text"/> at or after <paramref name="from"/>, or -1.</summary>
    private static int FirstStop(System.Text.StringBuilder text, IReadOnlyList<string> stops, int from)
    {
        if (stops.Count == 0) return -1;
        string tail = text.ToString(from, text.Length - from);
        int best = -1;
        foreach (string s in stops)
        {
            int i = tail.IndexOf(s, StringComparison.Ordinal);
            if (i >= 0 && (best < 0 || i < best)) best = i;
        }
        return best < 0 ? -1 : from + best;
    }

    /// <summary>Length of the longest end of <paramref name="text"/> that is the start of a stop sequence (it may still become one).</summary>
    private static int HeldBack(System.Text.StringBuilder text, IReadOnlyList<string> stops)
    {
        int held = 0;
        foreach (string s in stops)
            for (int k = Math.Min(s.Length - 1, text.Length); k > held; k--)
                if (text.ToString(text.Length - k, k) == s[..k]) { held = k; break; }
        return held;
    }

    /// <summary>The shared engine fixed at one width, so <see cref="TextGenerator"/> runs it as it is and concurrent requests keep their widths.</summary>
    private sealed class WidthEngine(IAnyPrecisionEngine engine, int bits) : IAnyPrecisionEngine
    {
        public LlamaConfig Config => engine.Config;
        public int SeedBits => engine.SeedBits;
        public int ParentBits => engine.ParentBits;
        public int Bits { get => bits; set => throw new NotSupportedException("a width view serves one width"); }
        public string Kernels => engine.Kernels;
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int width) => engine.Forward(tokens, cache, logits, width);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths) => engine.Forward(tokens, cache, logits, widths);
        public KvCache CreateCache(int capacity = 0) => engine.CreateCache(capacity);
        public void ForwardBatch(ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits, int width) => engine.ForwardBatch(tokens, caches, logits, width);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => engine.Forward(tokens, cache, logits, bits);
        public void Dispose() { } // the engine is the client's
    }
}
